//! A scripted in-process HTTP server for the CRM client tests: every request is recorded and
//! answered by a closure, so a test can play a token endpoint, a Dataverse environment or a
//! MuleSoft API, including its failures (401, 429, throttled parts).
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// HTTP method.
    pub method: String,
    /// Path and query, percent-decoded.
    pub target: String,
    /// Request headers.
    pub headers: HeaderMap,
    /// Body as text.
    pub body: String,
}

impl Seen {
    /// A header's value, or "".
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// The answer to a request: status, headers, body.
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string(),
        }
    }
    /// An answer with a header added.
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type Handler = dyn Fn(&Seen) -> Reply + Send + Sync;

/// A running mock server.
pub struct Mock {
    /// `http://127.0.0.1:port`.
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Mock {
    /// Start a server answering with `handler`.
    pub async fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Mock {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let (s, h) = (seen.clone(), handler.clone());
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let (s, h) = (s.clone(), h.clone());
                async move {
                    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                    let target = percent_decode(target);
                    let req = Seen {
                        method: method.to_string(),
                        target,
                        headers,
                        body: String::from_utf8_lossy(&body).into_owned(),
                    };
                    let reply = h(&req);
                    s.lock().unwrap().push(req);
                    let mut resp: Response =
                        (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
                    for (k, v) in reply.headers {
                        resp.headers_mut().insert(
                            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                            axum::http::HeaderValue::from_str(&v).unwrap(),
                        );
                    }
                    resp
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Mock { url, seen }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A token endpoint answer with a numbered token.
pub fn token_reply(n: usize) -> Reply {
    Reply::json(
        200,
        serde_json::json!({"token_type":"Bearer","expires_in":3599,"access_token":format!("tok-{n}")}),
    )
}

/// Form fields of an `application/x-www-form-urlencoded` body (values here need no decoding
/// beyond `+` and `%2F`-style escapes).
pub fn form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(&v.replace('+', " "))))
        .collect()
}

/// The project's CRM emulator (`trusst-cdc crm-emulator`) as a child process on a free port;
/// killed when dropped.
pub struct Emulator {
    /// `http://127.0.0.1:port`.
    pub url: String,
    child: std::process::Child,
}

impl Emulator {
    /// Start it with a config file (relative paths from the crate root).
    pub fn start(config: &str) -> Emulator {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_trusst-cdc"))
            .args([
                "crm-emulator",
                "--listen",
                "127.0.0.1:0",
                "--config",
                config,
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start trusst-cdc crm-emulator");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let url = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.split("listening on ").nth(1).map(|u| u.trim().to_owned()))
            .expect("the emulator did not say where it listens");
        // Keep draining its stdout so it never writes into a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Emulator { url, child }
    }

    /// Call an admin endpoint (`/__admin/...`); the JSON answer, or null.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let c = reqwest::Client::new();
        let mut req = c.request(
            method.parse().unwrap(),
            format!("{}/__admin{path}", self.url),
        );
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        assert!(
            resp.status().is_success(),
            "admin {path}: {}",
            resp.status()
        );
        resp.json().await.unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
