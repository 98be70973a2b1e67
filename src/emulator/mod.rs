//! `trusst-cdc crm-emulator`: one local HTTP(S) server that plays Salesforce (REST, sObject
//! Collections, Bulk API 2.0, OAuth), Microsoft Dataverse (Web API, `$batch`, bulk messages,
//! Entra ID tokens) and a customer's MuleSoft API, as the vendors document them, so that the
//! vendors' own client libraries work against it unchanged. Records are validated
//! against the schema file and kept in memory (optionally in a state file); faults are injected on
//! request; `/__admin/` exposes records, stats and the fault settings to tests.

mod admin;
mod batch;
mod bulk;
pub mod config;
mod dataverse;
pub mod faults;
mod mulesoft;
mod salesforce;
mod store;
mod tls;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use rand::RngExt;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{Error, Result};
use config::{EmulatorConfig, RateLimit};
use faults::{FaultState, Faults, Injected};
use store::Store;

/// Command-line arguments of `trusst-cdc crm-emulator`.
#[derive(Debug, clap::Args)]
pub struct EmulatorArgs {
    /// Schema file: credentials, limits and objects.
    #[arg(long, default_value = "connector-config/crm-emulator.toml")]
    pub config: PathBuf,
    /// Address to listen on; port 0 picks a free port (the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:18080")]
    pub listen: SocketAddr,
    /// Keep records in this JSON file: loaded at start, rewritten atomically after each write.
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate (chain); every URL handed out is then `https://`.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Faults to inject from the start (change them later with `POST /__admin/faults`).
    #[command(flatten)]
    pub faults: Faults,
}

/// The emulated systems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// Salesforce REST and Bulk API 2.0.
    Salesforce,
    /// Microsoft Dataverse Web API.
    Dataverse,
    /// A MuleSoft API on CloudHub.
    Mulesoft,
}

impl System {
    /// The system's name in stats, records routes and logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            System::Salesforce => "salesforce",
            System::Dataverse => "dataverse",
            System::Mulesoft => "mulesoft",
        }
    }
}

/// Serve until `shutdown` turns true.
pub async fn run(args: EmulatorArgs, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    let cfg = EmulatorConfig::load(&args.config)?;
    // Read the certificate before binding, so a bad file fails before anything listens.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            Error::user(format!(
                "cannot listen on {}: {e}; pick another --listen address",
                args.listen
            ))
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::internal("reading the bound address").with_source(e))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base_url = format!("{scheme}://{addr}");
    let app = Arc::new(App::new(
        cfg,
        base_url.clone(),
        args.state_file,
        args.faults,
    )?);
    // Scripts and tests read the base URL from this line (stdout); the log line is for operators.
    println!("listening on {base_url}");
    tracing::info!(%addr, "crm-emulator listening on {base_url}");
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let served = match tls {
        Some(config) => {
            let listener = tls::TlsListener::new(listener, config)
                .map_err(|e| Error::internal("starting the TLS listener").with_source(e))?;
            axum::serve(listener, router(app))
                .with_graceful_shutdown(stop)
                .await
        }
        None => {
            axum::serve(listener, router(app))
                .with_graceful_shutdown(stop)
                .await
        }
    };
    served.map_err(|e| Error::external("crm-emulator server failed").with_source(e))
}

/// The whole HTTP surface.
fn router(app: Arc<App>) -> Router {
    Router::new()
        .merge(salesforce::routes(&app))
        .merge(dataverse::routes(&app))
        .merge(mulesoft::routes(&app))
        .nest("/__admin", admin::routes())
        // Liveness for orchestrators (compose health checks); outside the emulated APIs.
        .route(
            "/health",
            axum::routing::get(crate::metrics::server::health),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "no such endpoint in the CRM emulator\n",
            )
        })
        // Bulk API 2.0 accepts uploads up to 150 MB; axum's default is 2 MB.
        .layer(DefaultBodyLimit::max(150 << 20))
        .with_state(app)
}

/// Shared state of the server.
pub(crate) struct App {
    cfg: EmulatorConfig,
    /// `http(s)://host:port`, the `instance_url` and the base of every link handed out.
    base_url: String,
    jwt_key: Option<jsonwebtoken::DecodingKey>,
    state_file: Option<PathBuf>,
    inner: Mutex<Inner>,
}

/// Everything that changes, behind one lock (never held across an await).
pub(crate) struct Inner {
    store: Store,
    tokens: HashMap<String, Token>,
    faults: FaultState,
    stats: Stats,
    /// Salesforce daily API usage.
    sf_usage: Usage,
    /// MuleSoft's rate-limit window (fixed, as API Manager's Rate Limiting policy counts).
    windows: HashMap<System, Usage>,
    /// Dataverse service protection: a sliding window, as Microsoft documents it.
    dv_requests: Sliding,
    jobs: BTreeMap<String, bulk::Job>,
}

struct Token {
    system: System,
    issued: Instant,
}

/// Calls counted since a window started.
struct Usage {
    used: u64,
    since: Instant,
}

impl Default for Usage {
    fn default() -> Self {
        Self {
            used: 0,
            since: Instant::now(),
        }
    }
}

/// Requests of the last `window`, for a limit counted over a sliding window: a request is
/// refused while `requests` others were accepted less than `window` ago, and the wait is until
/// the oldest of them leaves the window (unlike a fixed window, a burst straddling a window
/// boundary cannot get twice the limit through).
#[derive(Default)]
struct Sliding {
    accepted: VecDeque<Instant>,
}

impl Sliding {
    /// Forget requests older than the window.
    fn expire(&mut self, now: Instant, limit: &RateLimit) {
        while self
            .accepted
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= limit.window)
        {
            self.accepted.pop_front();
        }
    }

    /// Count one request at `now`, or say how long until one more fits.
    fn charge(&mut self, now: Instant, limit: &RateLimit) -> Result<(), Duration> {
        self.expire(now, limit);
        if self.accepted.len() as u64 >= limit.requests {
            let oldest = self.accepted.front().copied().unwrap_or(now);
            return Err(limit
                .window
                .saturating_sub(now.saturating_duration_since(oldest)));
        }
        self.accepted.push_back(now);
        Ok(())
    }

    /// Requests still allowed at `now`.
    fn remaining(&mut self, now: Instant, limit: &RateLimit) -> u64 {
        self.expire(now, limit);
        limit.requests.saturating_sub(self.accepted.len() as u64)
    }
}

/// Counters behind `GET /__admin/stats`.
#[derive(Default, Serialize)]
struct Stats {
    /// system -> "METHOD route" -> status -> calls.
    calls: BTreeMap<&'static str, BTreeMap<String, BTreeMap<u16, u64>>>,
    /// system -> tokens issued.
    tokens_issued: BTreeMap<&'static str, u64>,
    /// system -> injected fault -> calls.
    injected: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
}

/// Why the gate refused a data call; each system renders it in its own error format.
pub(crate) enum Refusal {
    /// 503.
    Unavailable,
    /// 429: wait this long.
    TooMany { retry_after: Duration },
}

impl App {
    fn new(
        cfg: EmulatorConfig,
        base_url: String,
        state_file: Option<PathBuf>,
        faults: Faults,
    ) -> Result<Self> {
        let jwt_key = match &cfg.salesforce.jwt_public_key {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::user(format!(
                        "cannot read salesforce.jwt_public_key {}: {e}",
                        path.display()
                    ))
                })?;
                Some(jsonwebtoken::DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                    Error::user(format!(
                        "salesforce.jwt_public_key {} is not an RSA public key (PEM): {e}",
                        path.display()
                    ))
                })?)
            }
            None => None,
        };
        let store = match &state_file {
            Some(path) => Store::load(path)?,
            None => Store::default(),
        };
        let inner = Inner {
            store,
            tokens: HashMap::new(),
            faults: FaultState::new(faults),
            stats: Stats::default(),
            sf_usage: Usage::default(),
            windows: HashMap::new(),
            dv_requests: Sliding::default(),
            jobs: BTreeMap::new(),
        };
        Ok(Self {
            cfg,
            base_url,
            jwt_key,
            state_file,
            inner: Mutex::new(inner),
        })
    }

    /// The state, whatever an earlier panicking handler left (see [`Injected::Drop`]).
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Write the state file after a change; a failure is logged, the request still succeeds
    /// (the records are in memory).
    fn persist(&self, inner: &Inner) {
        if let Some(path) = &self.state_file
            && let Err(e) = inner.store.save(path)
        {
            tracing::error!(path = %path.display(), "cannot write the state file: {e}");
        }
    }

    /// Issue an access token for a system.
    fn issue_token(&self, system: System, prefix: &str) -> String {
        let token = format!("{prefix}{}", random_string(48));
        let mut inner = self.lock();
        inner.tokens.insert(
            token.clone(),
            Token {
                system,
                issued: Instant::now(),
            },
        );
        *inner.stats.tokens_issued.entry(system.name()).or_default() += 1;
        token
    }

    /// How long a system's tokens live.
    fn token_lifetime(&self, inner: &Inner, system: System) -> Duration {
        match inner.faults.get().token_lifetime_secs {
            Some(secs) => Duration::from_secs(secs),
            None => match system {
                System::Salesforce => self.cfg.salesforce.token_lifetime,
                System::Dataverse => self.cfg.dataverse.token_lifetime,
                System::Mulesoft => self.cfg.mulesoft.token_lifetime,
            },
        }
    }

    /// True when the request carries a live bearer token issued for this system.
    fn bearer_ok(&self, system: System, headers: &HeaderMap) -> bool {
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
        else {
            return false;
        };
        let inner = self.lock();
        inner.tokens.get(token.trim()).is_some_and(|t| {
            t.system == system && t.issued.elapsed() < self.token_lifetime(&inner, system)
        })
    }

    /// Apply the injected faults to one data call: sleep the latency, then maybe refuse it. A
    /// dropped call unwinds the handler without running the panic hook: hyper then closes the
    /// connection with no response, which is what a client sees when a load balancer or the
    /// network drops it.
    async fn inject(&self, system: System) -> Result<(), Refusal> {
        let (latency, fault) = {
            let mut inner = self.lock();
            let rolled = inner.faults.roll(system);
            if let Some(f) = rolled.1 {
                *inner
                    .stats
                    .injected
                    .entry(system.name())
                    .or_default()
                    .entry(f.name())
                    .or_default() += 1;
            }
            rolled
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match fault {
            None => Ok(()),
            Some(Injected::Drop) => {
                tracing::debug!(
                    system = system.name(),
                    "dropping a connection (fault injection)"
                );
                std::panic::resume_unwind(Box::new("connection dropped by fault injection"))
            }
            Some(Injected::Unavailable) => Err(Refusal::Unavailable),
            Some(Injected::TooMany) => Err(Refusal::TooMany {
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Dataverse requests still allowed in the sliding window.
    fn dv_remaining(&self, limit: &RateLimit) -> u64 {
        self.lock().dv_requests.remaining(Instant::now(), limit)
    }

    /// Count one Dataverse request against service protection. A `$batch` and a bulk message
    /// are one request each, as Microsoft documents: their inner operations only add to the
    /// execution-time and entitlement limits, which the emulator does not model.
    fn dv_charge(&self, limit: &RateLimit) -> Result<(), Refusal> {
        self.lock()
            .dv_requests
            .charge(Instant::now(), limit)
            .map_err(|retry_after| Refusal::TooMany { retry_after })
    }

    /// Count `cost` requests against a system's fixed rate-limit window (MuleSoft).
    fn charge(&self, system: System, cost: u64, limit: &RateLimit) -> Result<(), Refusal> {
        let mut inner = self.lock();
        let w = inner.windows.entry(system).or_default();
        if w.since.elapsed() >= limit.window {
            *w = Usage::default();
        }
        if w.used + cost > limit.requests {
            let retry_after = limit.window.saturating_sub(w.since.elapsed());
            return Err(Refusal::TooMany { retry_after });
        }
        w.used += cost;
        Ok(())
    }
}

/// Count every call by system, route and status.
async fn track(
    State((app, system)): State<(Arc<App>, System)>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("(unmatched)", MatchedPath::as_str);
    let label = format!("{} {route}", req.method());
    let res = next.run(req).await;
    let mut inner = app.lock();
    let calls = inner
        .stats
        .calls
        .entry(system.name())
        .or_default()
        .entry(label)
        .or_default();
    *calls.entry(res.status().as_u16()).or_default() += 1;
    res
}

/// The tracking layer for a system's router.
fn tracked(router: Router<Arc<App>>, app: &Arc<App>, system: System) -> Router<Arc<App>> {
    router.layer(middleware::from_fn_with_state((app.clone(), system), track))
}

/// A JSON response.
fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// A random alphanumeric string.
fn random_string(len: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// A random (version 4) GUID.
fn guid() -> String {
    let n =
        (rand::random::<u128>() & !(0xf000 << 64) & !(0xc << 60)) | (0x4000 << 64) | (0x8 << 60);
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A header's value as text.
fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The client id and secret of a client-credentials token request: form fields, or HTTP Basic
/// as RFC 6749 section 2.3.1 defines it (each form-encoded, then joined by `:`), which both
/// Salesforce and Entra ID accept and simple-salesforce sends instead of form fields. A form
/// field wins over Basic.
fn client_credentials(
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> (Option<String>, Option<String>) {
    use base64::Engine;
    let basic = header_str(headers, "authorization")
        .and_then(|v| {
            let (scheme, value) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("basic")
                .then(|| base64::engine::general_purpose::STANDARD.decode(value.trim()))
        })
        .and_then(Result::ok)
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| {
            let (id, secret) = text.split_once(':')?;
            let unform = |s: &str| decode(&s.replace('+', " "));
            Some((unform(id), unform(secret)))
        });
    let (basic_id, basic_secret) = basic.unzip();
    (
        form.get("client_id").cloned().or(basic_id),
        form.get("client_secret").cloned().or(basic_secret),
    )
}

/// A query-string parameter, percent-decoded (`+` is a space, as in forms).
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(&k.replace('+', " ")) == name).then(|| decode(&v.replace('+', " ")))
    })
}

/// Percent-decode a URL component (`+` stays a plus, as in paths).
fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_version_4() {
        let g = guid();
        assert_eq!(g.len(), 36);
        assert_eq!(&g[14..15], "4");
        assert!(matches!(&g[19..20], "8" | "9" | "a" | "b"), "{g}");
    }

    #[test]
    fn the_service_protection_window_slides() {
        let limit = RateLimit {
            requests: 2,
            window: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Sliding::default();
        assert_eq!(w.charge(at(0), &limit), Ok(()));
        assert_eq!(w.charge(at(6), &limit), Ok(()));
        assert_eq!(w.remaining(at(7), &limit), 0);
        // Full until the first request is 10 s old; the wait says exactly that.
        assert_eq!(w.charge(at(7), &limit), Err(Duration::from_secs(3)));
        assert_eq!(w.charge(at(10), &limit), Ok(()));
        // A fixed window would have started afresh at 10 s; this one still holds the request
        // of 6 s.
        assert_eq!(w.charge(at(11), &limit), Err(Duration::from_secs(5)));
        assert_eq!(w.remaining(at(16), &limit), 1);
    }

    #[test]
    fn query_params_are_decoded() {
        let q = Some("ids=001%2C002&allOrNone=true&$select=a,b");
        assert_eq!(query_param(q, "ids").as_deref(), Some("001,002"));
        assert_eq!(query_param(q, "$select").as_deref(), Some("a,b"));
        assert_eq!(query_param(q, "x"), None);
    }
}
