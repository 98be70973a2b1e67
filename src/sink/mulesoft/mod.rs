//! MuleSoft target: POSTs the integration guide's payload to the customer's API.
//!
//! The API sits behind API Manager policies: Client ID Enforcement (`client_id` /
//! `client_secret` headers, or HTTP Basic: both are sent) or OAuth 2.0 token enforcement (a Bearer token from the customer's
//! identity provider). Its answer counts processed and failed contacts; [`response`] decides
//! which contacts failed without ever taking a failed one for written. The API has no delete.

pub mod config;
pub mod profile;
pub mod response;

use async_trait::async_trait;
use reqwest::StatusCode;
use reqwest::header::ACCEPT;
use serde_json::Value;

pub use config::{Auth, Config};
pub use profile::PROFILE;

use crate::error::{Error, Result};
use crate::sink::mapping::{Mapping, Record};
use crate::sink::oauth::ClientCredentials;
use crate::sink::verdict::{Verdict, of_status};
use crate::sink::{Outcome, Target, http};

/// Why a delete event cannot be carried out, given per record.
pub const NO_DELETE: &str = "the MuleSoft API has no delete operation; set on_delete = \"ignore\"";

/// Why a contact the API refuses as too large even on its own is rejected, given per record.
pub const TOO_LARGE: &str = "the MuleSoft API refused this contact's payload as too large (HTTP 413) even \
     sent on its own; raise the request size limit of the API (or of the gateway in front of it), then \
     re-drive the contact from the dead-letter topic";

enum Credentials {
    ClientId { id: String, secret: String },
    Oauth(ClientCredentials),
}

/// A MuleSoft API endpoint taking the guide's payload.
pub struct Mulesoft {
    url: String,
    /// `[mulesoft] accept_empty_2xx`.
    accept_empty_2xx: bool,
    batch_size: usize,
    http: reqwest::Client,
    creds: Credentials,
}

impl std::fmt::Debug for Mulesoft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mulesoft")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// What became of one POST, when it was not an error for the whole call.
enum Posted {
    /// 2xx, with the body.
    Accepted(String),
    /// A 4xx that refuses the payload's content (400, 409, 422...), with status and body.
    Refused(StatusCode, String),
    /// 413: the payload is larger than the API (or a gateway in front of it) takes.
    TooLarge,
}

impl Mulesoft {
    /// A client for `cfg`; resolves the client secret, sends nothing yet.
    pub fn new(cfg: &Config) -> Result<Self> {
        reqwest::Url::parse(&cfg.url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                Error::user(format!(
                    "[mulesoft] url {:?} is not an http(s) URL",
                    cfg.url
                ))
            })?;
        if cfg.batch_size == 0 {
            return Err(Error::user("[mulesoft] batch_size must be at least 1"));
        }
        let secret = cfg.client_secret.resolve("[mulesoft] client_secret")?;
        let creds = match cfg.auth {
            Auth::ClientId => Credentials::ClientId {
                id: cfg.client_id.clone(),
                secret,
            },
            Auth::Oauth => {
                let token_url = cfg.token_url.clone().ok_or_else(|| {
                    Error::user("[mulesoft] token_url is required when auth = \"oauth\"")
                })?;
                Credentials::Oauth(ClientCredentials::new(
                    "[mulesoft]",
                    token_url,
                    cfg.client_id.clone(),
                    secret,
                    None,
                ))
            }
        };
        Ok(Self {
            url: cfg.url.clone(),
            accept_empty_2xx: cfg.accept_empty_2xx,
            batch_size: cfg.batch_size,
            http: http::client(cfg.request_timeout)?,
            creds,
        })
    }

    /// POST one payload with credentials. 401/403 fetch a new OAuth token and try once more;
    /// 429 waits for the rate-limit reset; 5xx and timeouts are retryable errors.
    async fn post(&mut self, payload: &Value) -> Result<Posted> {
        let what = "MuleSoft API";
        let mut retried = false;
        loop {
            let mut req = self
                .http
                .post(&self.url)
                .header(ACCEPT, "application/json")
                .json(payload);
            req = match &mut self.creds {
                // Client ID Enforcement reads either the headers or HTTP Basic, as the policy is
                // set up; sending both works with either setup.
                Credentials::ClientId { id, secret } => req
                    .header("client_id", id.as_str())
                    .header("client_secret", secret.as_str())
                    .basic_auth(id.as_str(), Some(secret.as_str())),
                Credentials::Oauth(cc) => req.bearer_auth(cc.token(&self.http).await?),
            };
            let resp = http::send("mulesoft", what, req).await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.text().await.map_err(|e| http::transport(what, e))?;
            let brief: String = body.chars().take(300).collect();
            match status.as_u16() {
                200..=299 => return Ok(Posted::Accepted(body)),
                401 | 403 => match &mut self.creds {
                    Credentials::Oauth(cc) if !retried => {
                        tracing::warn!(%status, "MuleSoft API refused the token; fetching a new one and retrying once");
                        cc.invalidate();
                        retried = true;
                    }
                    Credentials::Oauth(cc) => {
                        cc.invalidate();
                        return Err(Verdict::Stop.error(format!(
                            "{what} refused a fresh OAuth token (HTTP {status}: {brief}); check [mulesoft] client_id, \
                             client_secret and token_url, and that the client is granted access to the API"
                        )));
                    }
                    Credentials::ClientId { .. } => {
                        return Err(Verdict::Stop.error(format!(
                            "{what} refused the client credentials (HTTP {status}: {brief}); check [mulesoft] client_id and \
                             client_secret, or set auth = \"oauth\" if the API's policy wants a token"
                        )));
                    }
                },
                404 | 405 => {
                    return Err(Verdict::Stop.error(format!(
                        "{what}: HTTP {status} at {}: {brief}; check [mulesoft] url",
                        self.url
                    )));
                }
                413 => return Ok(Posted::TooLarge),
                // No rate-limit header: the runner's exponential backoff with jitter applies.
                code => match of_status(code, response::rate_limit_wait(&headers)) {
                    Verdict::DeadLetter => return Ok(Posted::Refused(status, body)),
                    v => return Err(v.error(format!("{what}: HTTP {status}: {brief}"))),
                },
            }
        }
    }

    /// Send one chunk. When the API refuses the payload (4xx) but names the contacts at fault,
    /// those are rejected and the others are sent once more on their own, so one bad contact
    /// does not take its neighbours to the dead-letter topic. `None`: the API found the
    /// payload too large (413).
    async fn upsert_chunk(&mut self, chunk: &[Record]) -> Result<Option<Vec<Outcome>>> {
        let mut out: Vec<Option<Outcome>> = vec![None; chunk.len()];
        let mut pending: Vec<usize> = (0..chunk.len()).collect();
        for attempt in 0..2 {
            let payload = response::payload(
                pending.iter().map(|&i| &chunk[i].fields),
                chrono::Utc::now(),
            );
            let ids: Vec<&str> = pending
                .iter()
                .map(|&i| chunk[i].contact_id.as_str())
                .collect();
            tracing::debug!(contacts = ids.len(), "posting to the MuleSoft API");
            match self.post(&payload).await? {
                Posted::TooLarge => return Ok(None),
                Posted::Accepted(body) => {
                    let answer = match response::documented_answer(&body) {
                        Some(a) => a,
                        None if body.trim().is_empty() && self.accept_empty_2xx => {
                            response::Answer::default()
                        }
                        None => {
                            // Not the API's answer (a proxy's page, a login wall): nothing says
                            // the contacts were written, so the request is tried again.
                            let brief: String = body.chars().take(200).collect();
                            return Err(Error::external(format!(
                                "the MuleSoft API answered 2xx with a body that is not its documented answer \
                                 ({{\"records_processed\", \"records_failed\", \"errors\"}}): {brief:?}; is a proxy \
                                 or login page in front of [mulesoft] url? (an API that answers an empty 2xx on \
                                 purpose needs accept_empty_2xx = true)"
                            )));
                        }
                    };
                    for (&i, o) in pending.iter().zip(response::outcomes(&ids, &answer)) {
                        out[i] = Some(o);
                    }
                    break;
                }
                Posted::Refused(status, body) => {
                    let answer = response::parse_answer(&body);
                    let (tied, _) = response::attribute(&ids, &answer.errors);
                    let whole: String = format!(
                        "HTTP {status}: {}",
                        body.chars().take(300).collect::<String>()
                    );
                    let contact_ids = crate::sink::contact_ids(ids.iter().copied());
                    tracing::warn!(%status, tied = tied.len(), of = ids.len(), contact_ids, "MuleSoft API refused the payload");
                    let resend = attempt == 0 && !tied.is_empty() && tied.len() < ids.len();
                    let mut rest = Vec::new();
                    for (pos, &i) in pending.iter().enumerate() {
                        match tied.get(&pos) {
                            Some(msgs) => out[i] = Some(Outcome::Rejected(msgs.join("; "))),
                            None if resend => rest.push(i),
                            None => out[i] = Some(Outcome::Rejected(whole.clone())),
                        }
                    }
                    if rest.is_empty() {
                        break;
                    }
                    pending = rest;
                }
            }
        }
        let out: Vec<Outcome> = out
            .into_iter()
            .map(|o| o.expect("every contact has an outcome"))
            .collect();
        let rejected: Vec<&str> = chunk
            .iter()
            .zip(&out)
            .filter(|(_, o)| matches!(o, Outcome::Rejected(_)))
            .map(|(r, _)| r.contact_id.as_str())
            .collect();
        if !rejected.is_empty() {
            let contact_ids = crate::sink::contact_ids(rejected.iter().copied());
            tracing::warn!(
                rejected = rejected.len(),
                of = out.len(),
                contact_ids,
                "MuleSoft API did not take every contact"
            );
        }
        Ok(Some(out))
    }
}

#[async_trait]
impl Target for Mulesoft {
    /// OAuth: fetch a token, so bad credentials fail at start. Client ID: the API has no
    /// metadata to check, so nothing is sent.
    async fn prepare(&mut self, _mapping: &mut Mapping) -> Result<()> {
        match &mut self.creds {
            Credentials::Oauth(cc) => {
                cc.token(&self.http).await?;
                tracing::info!(url = %self.url, "MuleSoft OAuth token obtained");
            }
            Credentials::ClientId { .. } => {
                tracing::info!(url = %self.url, "MuleSoft client-id auth; nothing to check before the first request")
            }
        }
        Ok(())
    }

    fn max_batch(&self) -> usize {
        self.batch_size
    }

    /// POST the guide's payload in chunks of `batch_size`; one outcome per contact. A chunk the
    /// API finds too large (413) is sent again in halves, so a size limit the config cannot know
    /// costs a few requests instead of stopping the sink; a contact too large on its own is
    /// rejected with [`TOO_LARGE`].
    async fn upsert(&mut self, _mapping: &Mapping, records: &[Record]) -> Result<Vec<Outcome>> {
        let mut out = Vec::with_capacity(records.len());
        // Chunks still to send, the next on top: halves go back in order.
        let mut todo: Vec<&[Record]> = records.chunks(self.batch_size).rev().collect();
        while let Some(chunk) = todo.pop() {
            match self.upsert_chunk(chunk).await? {
                Some(outcomes) => out.extend(outcomes),
                None if chunk.len() > 1 => {
                    let (first, second) = chunk.split_at(chunk.len() / 2);
                    tracing::warn!(
                        contacts = chunk.len(),
                        "MuleSoft API: payload too large (HTTP 413); sending it again in halves \
                         (a smaller [mulesoft] batch_size saves these requests)"
                    );
                    todo.push(second);
                    todo.push(first);
                }
                None => {
                    tracing::warn!(contact_id = %chunk[0].contact_id, "{TOO_LARGE}");
                    out.push(Outcome::Rejected(TOO_LARGE.to_owned()));
                }
            }
        }
        Ok(out)
    }

    /// The API has no delete: every contact is rejected with [`NO_DELETE`].
    async fn delete(&mut self, _mapping: &Mapping, contact_ids: &[String]) -> Result<Vec<Outcome>> {
        Ok(contact_ids
            .iter()
            .map(|_| Outcome::Rejected(NO_DELETE.to_owned()))
            .collect())
    }

    /// `POST <url> <payload>` per request `upsert` would send.
    fn dry_run(&self, _mapping: &Mapping, records: &[Record]) -> Vec<String> {
        records
            .chunks(self.batch_size)
            .map(|c| {
                format!(
                    "POST {} {}",
                    self.url,
                    response::payload(c.iter().map(|r| &r.fields), chrono::Utc::now())
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::http::Secret;
    use crate::sink::mapping::{MappingConfig, TargetKind};

    fn cfg(auth: Auth) -> Config {
        Config {
            url: "https://org.us-e1.cloudhub.io/api/trusst-crm-sync".into(),
            auth,
            client_id: "id".into(),
            client_secret: Secret {
                value: Some("s".into()),
                ..Default::default()
            },
            token_url: None,
            batch_size: 2,
            request_timeout: std::time::Duration::from_secs(5),
            accept_empty_2xx: false,
        }
    }

    fn record(id: &str) -> Record {
        let mut fields = serde_json::Map::new();
        fields.insert("trusst_contact_id".into(), id.into());
        Record::new(id, fields)
    }

    #[test]
    fn dry_run_one_post_per_chunk() {
        let m = Mulesoft::new(&cfg(Auth::ClientId)).unwrap();
        let mapping = Mapping::new(TargetKind::Mulesoft, &MappingConfig::default());
        let lines = m.dry_run(&mapping, &[record("a"), record("b"), record("c")]);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("POST https://org.us-e1.cloudhub.io/api/trusst-crm-sync {"));
        let body: Value = serde_json::from_str(lines[0].splitn(3, ' ').nth(2).unwrap()).unwrap();
        assert_eq!(body["source"], "trusst-platform");
        assert_eq!(body["contacts"].as_array().unwrap().len(), 2);
        assert!(body["sync_timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn oauth_needs_a_token_url() {
        assert!(
            Mulesoft::new(&cfg(Auth::Oauth))
                .unwrap_err()
                .message()
                .contains("token_url")
        );
        let mut c = cfg(Auth::ClientId);
        c.url = "cloudhub".into();
        assert!(
            Mulesoft::new(&c)
                .unwrap_err()
                .message()
                .contains("[mulesoft] url")
        );
    }

    #[tokio::test]
    async fn delete_is_rejected_with_the_fix() {
        let mut m = Mulesoft::new(&cfg(Auth::ClientId)).unwrap();
        let mapping = Mapping::new(TargetKind::Mulesoft, &MappingConfig::default());
        let out = m.delete(&mapping, &["a".into()]).await.unwrap();
        assert_eq!(out, [Outcome::Rejected(NO_DELETE.into())]);
    }
}
