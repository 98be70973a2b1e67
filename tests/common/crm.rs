//! Harness for the sink tests: the CRM emulator and sinks as child processes, and readers of
//! what reached the emulator.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Expected, bin, brokers, unique};

/// Start `trusst-cdc crm-emulator` on a free port with `config` and extra flags; the child and
/// its base URL (read from the `listening on` line it prints).
pub fn spawn_emulator(config: &std::path::Path, flags: &[&str]) -> (Child, String) {
    let mut child = Command::new(bin())
        .args(["crm-emulator", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env("TRUSST_LOG", "warn")
        .spawn()
        .expect("start crm-emulator");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("emulator said {line:?}"))
        .to_owned();
    (child, base)
}

/// A running `trusst-cdc crm-emulator`.
pub struct Emulator {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Emulator {
    /// Start on a free port with the shipped schema and extra flags.
    pub fn start(flags: &[&str]) -> Self {
        let config = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/connector-config/crm-emulator.toml"
        );
        Self::start_with_config(std::path::Path::new(config), flags)
    }

    /// Start on a free port with another emulator config (e.g. more fields).
    pub fn start_with_config(config: &std::path::Path, flags: &[&str]) -> Self {
        let (child, base) = spawn_emulator(config, flags);
        Self { child, base }
    }

    /// Stored records of one object (`salesforce`/`Contact`, `dataverse`/`contact`, `mulesoft`/`contacts`).
    pub fn records(&self, system: &str, object: &str) -> Vec<Value> {
        let url = format!("{}/__admin/records/{system}/{object}", self.base);
        ureq::get(&url)
            .call()
            .unwrap()
            .body_mut()
            .read_json::<Vec<Value>>()
            .unwrap()
    }

    /// Set faults (a JSON merge patch).
    pub fn faults(&self, patch: Value) {
        ureq::post(&format!("{}/__admin/faults", self.base))
            .send_json(&patch)
            .expect("faults accepted");
    }

    /// POST an admin action (`reset-limits`, `expire-tokens`, `reset`).
    pub fn admin(&self, action: &str) {
        ureq::post(&format!("{}/__admin/{action}", self.base))
            .send_empty()
            .expect("admin action accepted");
    }

    /// Call counters.
    pub fn stats(&self) -> Value {
        ureq::get(&format!("{}/__admin/stats", self.base))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `trusst-cdc sink`.
pub struct SinkProc {
    pub child: Child,
    pub config: PathBuf,
    pub log: PathBuf,
    pub dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

/// Write a sink config from a shipped example (`salesforce`, `dynamics`, `mulesoft`) with the
/// test's topic, a unique group, and `edit` applied to the TOML table.
pub fn sink_config(
    example: &str,
    topic: &str,
    edit: impl FnOnce(&mut toml::Table),
) -> (tempfile::TempDir, PathBuf) {
    let path = format!(
        "{}/connector-config/{example}.toml",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let kafka = t.get_mut("kafka").unwrap().as_table_mut().unwrap();
    kafka.insert("topic".into(), topic.into());
    kafka.insert("group_id".into(), unique("group").into());
    let sink = t.get_mut("sink").unwrap().as_table_mut().unwrap();
    sink.insert("batch_max_wait".into(), "100ms".into());
    sink.insert("max_backoff".into(), "2s".into());
    edit(&mut t);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{example}.toml"));
    std::fs::write(&file, toml::to_string(&t).unwrap()).unwrap();
    (dir, file)
}

/// Set `[section] key = value` in a config table.
pub fn set(t: &mut toml::Table, section: &str, key: &str, value: impl Into<toml::Value>) {
    t.entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
        .insert(key.into(), value.into());
}

impl SinkProc {
    /// Start a sink against the emulator with `args` after `sink --config <file>`.
    pub fn start(emu: &Emulator, dir: tempfile::TempDir, config: PathBuf, args: &[&str]) -> Self {
        Self::start_with_env(emu, dir, config, args, &[])
    }

    /// The same with `extra` environment variables (which win over the defaults).
    pub fn start_with_env(
        emu: &Emulator,
        dir: tempfile::TempDir,
        config: PathBuf,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> Self {
        let mut env = vec![
            ("KAFKA_BROKERS".to_owned(), brokers()),
            ("SALESFORCE_LOGIN_URL".to_owned(), emu.base.clone()),
            (
                "SALESFORCE_CLIENT_SECRET".to_owned(),
                "trusst-sf-secret".to_owned(),
            ),
            ("DYNAMICS_URL".to_owned(), emu.base.clone()),
            (
                "DYNAMICS_TOKEN_URL".to_owned(),
                format!("{}/trusst-tenant/oauth2/v2.0/token", emu.base),
            ),
            (
                "DYNAMICS_CLIENT_SECRET".to_owned(),
                "trusst-dv-secret".to_owned(),
            ),
            (
                "MULESOFT_URL".to_owned(),
                format!("{}/api/trusst-crm-sync", emu.base),
            ),
            (
                "MULESOFT_CLIENT_SECRET".to_owned(),
                "trusst-mule-secret".to_owned(),
            ),
            ("TRUSST_LOG".to_owned(), "info,trusst_cdc=debug".to_owned()),
            // Tests run side by side: each process takes a free port and logs it.
            ("TRUSST_METRICS_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ];
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let log = dir
            .path()
            .join(format!("sink-{}.log", rand::random::<u32>()));
        let child = Self::spawn(&config, &log, &env, args);
        Self {
            child,
            config,
            log,
            dir,
            env,
        }
    }

    fn spawn(config: &PathBuf, log: &PathBuf, env: &[(String, String)], args: &[&str]) -> Child {
        Command::new(bin())
            .args(["sink", "--config"])
            .arg(config)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("start trusst-cdc sink")
    }

    /// Wait for the process to exit (at most `timeout`); its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the sink did not exit within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kill -9` and start again with the same config (same consumer group).
    pub fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log = self
            .dir
            .path()
            .join(format!("sink-{}.log", rand::random::<u32>()));
        self.child = Self::spawn(&self.config, &self.log, &self.env, &[]);
    }

    /// Run another command with the same config and environment to completion.
    pub fn run_to_end(&self, args: &[&str]) -> (std::process::ExitStatus, String, String) {
        let log = self
            .dir
            .path()
            .join(format!("run-{}.log", rand::random::<u32>()));
        let mut c = Self::spawn(&self.config, &log, &self.env, args);
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "sink {args:?} did not finish");
            std::thread::sleep(Duration::from_millis(100));
        };
        let out = std::fs::read_to_string(log.with_extension("out")).unwrap_or_default();
        (
            status,
            out,
            std::fs::read_to_string(&log).unwrap_or_default(),
        )
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fail with the log when the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(s) = self.child.try_wait().unwrap() {
            panic!("sink exited with {s}:\n{}", self.log());
        }
    }

    /// `http://host:port` of the sink's metrics endpoint, once it logged it.
    pub fn metrics_url(&mut self) -> String {
        super::metrics::wait_endpoint("sink", || {
            self.assert_running();
            self.log()
        })
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for SinkProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        super::log_on_panic("sink", &self.log);
    }
}

/// Poll until `check` returns true, or panic with `what` and the last value it saw.
pub fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(last) if Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// The seed's naming rule for Salesforce, written out independently of the connector's.
pub fn sf_field(key: &str) -> String {
    key.split('_')
        .map(|w| format!("{}{}", w[..1].to_uppercase(), &w[1..]))
        .collect::<Vec<_>>()
        .join("_")
        + "__c"
}

pub const LABELS: [&str; 4] = ["Excellent", "Good", "Fair", "Poor"];

/// The value a CRM should hold for a raw result (Dynamics choices are 100000000 + index).
pub fn typed(system: &str, result_type: &str, raw: &str) -> Value {
    match (result_type, system) {
        ("Boolean", _) => json!(raw == "true"),
        ("Rating", "dataverse") => json!(raw.parse::<i64>().unwrap()),
        ("Rating", _) => json!(raw.parse::<f64>().unwrap()),
        ("Label", "dataverse") => {
            json!(100_000_000 + LABELS.iter().position(|l| *l == raw).unwrap() as i64)
        }
        _ => json!(raw),
    }
}

pub fn num_eq(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Compare the emulator's records with the seed's query: same contacts, same typed values.
pub fn crm_matches(
    emu: &Emulator,
    system: &str,
    expected: &BTreeMap<String, Expected>,
) -> Result<(), String> {
    let (object, key) = match system {
        "salesforce" => ("Contact", "Trusst_Contact_ID__c"),
        "dataverse" => ("contact", "trusst_contact_id"),
        _ => ("contacts", "trusst_contact_id"),
    };
    let records = emu.records(system, object);
    let by_id: BTreeMap<String, &Value> = records
        .iter()
        .map(|r| (r[key].as_str().unwrap_or_default().to_owned(), r))
        .collect();
    if records.len() != by_id.len() {
        return Err(format!(
            "{} records for {} contacts: duplicates",
            records.len(),
            by_id.len()
        ));
    }
    if by_id.len() != expected.len() {
        return Err(format!(
            "{} records in the CRM, {} contacts in the seed query",
            by_id.len(),
            expected.len()
        ));
    }
    for (id, e) in expected {
        let r = by_id
            .get(id)
            .ok_or_else(|| format!("contact {id} missing"))?;
        for (qkey, (rt, raw)) in &e.results {
            let raw = raw.as_deref().unwrap_or_default();
            let (got, want) = match system {
                "salesforce" => (r[sf_field(qkey)].clone(), typed(system, rt, raw)),
                "dataverse" => (r[qkey.as_str()].clone(), typed(system, rt, raw)),
                _ => {
                    let q = r["universal_questions"]
                        .as_array()
                        .and_then(|qs| qs.iter().find(|q| q["question_key"] == qkey.as_str()));
                    (
                        q.map(|q| q["result"].clone()).unwrap_or(Value::Null),
                        json!(raw),
                    )
                }
            };
            if !num_eq(&got, &want) {
                return Err(format!(
                    "contact {id} {qkey}: CRM has {got}, seed query says {want}"
                ));
            }
        }
        let agent = match system {
            "salesforce" => &r["Agent_ID__c"],
            "dataverse" => &r["agentid"],
            _ => &r["contact_agent_id"],
        };
        if agent.as_str() != e.contact_agent_id.as_deref() {
            return Err(format!(
                "contact {id}: agent {agent} != {:?}",
                e.contact_agent_id
            ));
        }
    }
    Ok(())
}

/// No record keeps an answer the database no longer has: for every record and every question
/// key in `keys`, a contact whose seed-query row lacks that key holds null (or nothing) there.
pub fn no_stale_answers(
    emu: &Emulator,
    system: &str,
    expected: &BTreeMap<String, Expected>,
    keys: &[String],
) -> Result<(), String> {
    let (object, key) = match system {
        "salesforce" => ("Contact", "Trusst_Contact_ID__c"),
        "dataverse" => ("contact", "trusst_contact_id"),
        _ => ("contacts", "trusst_contact_id"),
    };
    for r in emu.records(system, object) {
        let id = r[key].as_str().unwrap_or_default();
        for qkey in keys {
            if expected
                .get(id)
                .is_some_and(|e| e.results.contains_key(qkey))
            {
                continue;
            }
            let held = match system {
                "salesforce" => r[sf_field(qkey)].clone(),
                "dataverse" => r[qkey.as_str()].clone(),
                _ => r["universal_questions"]
                    .as_array()
                    .and_then(|qs| qs.iter().find(|q| q["question_key"] == qkey.as_str()))
                    .map(|q| q["result"].clone())
                    .unwrap_or(Value::Null),
            };
            if !held.is_null() {
                return Err(format!(
                    "contact {id} {qkey}: the CRM still holds {held}, the database has no answer"
                ));
            }
        }
    }
    Ok(())
}
