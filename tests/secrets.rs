//! Database credentials from AWS Secrets Manager, against moto's server mode (a real HTTP
//! server speaking the Secrets Manager API) on loopback: the source, backfill and check read the
//! integration guide's `trusst/{customer}/db-readonly-user` secret, events reach Kafka, the
//! password never reaches stderr, and bad secrets are named with their fix.
//!
//! `MOTO_SERVER` names the `moto_server` executable (scripts/test.sh installs moto from PyPI into
//! .cache/moto-venv and sets it).

mod common;

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
use common::*;

/// A moto server on a free loopback port, stopped on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start() -> Self {
        let bin = std::env::var("MOTO_SERVER").unwrap_or_else(|_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/.cache/moto-venv/bin/moto_server"
            )
            .into()
        });
        assert!(
            PathBuf::from(&bin).exists(),
            "moto_server not found at {bin}: run scripts/test.sh (it installs moto into .cache/moto-venv) or set MOTO_SERVER"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(s) = child.try_wait().unwrap() {
                panic!("moto_server exited with {s}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Store `json` as the secret `name`.
    async fn put(&self, name: &str, json: &str) {
        let conf = aws_sdk_secretsmanager::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
            .build();
        aws_sdk_secretsmanager::Client::from_conf(conf)
            .create_secret()
            .name(name)
            .secret_string(json)
            .send()
            .await
            .expect("create the secret in moto");
    }

    /// The environment that points the connector's AWS SDK at this server.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL_SECRETS_MANAGER", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The region of the integration guide's example.
const REGION: &str = "ap-southeast-2";

/// The test cluster's port (the secret's `port`).
fn pg_port() -> u16 {
    trusst_cdc::pg::parse_url(&base_url())
        .unwrap()
        .config
        .get_ports()[0]
}

fn secret_opts(moto: &Moto, customer: &str) -> SourceOpts {
    SourceOpts {
        database: Some(format!(
            "secret = {{ customer = \"{customer}\", region = \"{REGION}\" }}\nsslmode = \"disable\""
        )),
        env: moto.env(),
        // Everything the SDK, hyper and the connector trace, to prove none of it carries the password.
        log_filter: "trace",
        ..Default::default()
    }
}

/// Run a one-shot command with the source config of `src`.
fn run(opts: &SourceOpts, config: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = opts.command(args[0], config, "");
    cmd.args(&args[1..]);
    cmd.output().expect("run trusst-cdc")
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_credentials_drive_source_backfill_and_check() {
    let moto = Moto::start();
    let db = TestDb::new("secret").await;
    // A role of its own, so the password is a string nothing else would print.
    let role = unique("cdc_ro");
    let password = format!(
        "Pw-{:016x}-{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    );
    let admin = trusst_cdc::pg::connect(&base_url()).await.unwrap();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'"
        ))
        .await
        .unwrap();
    let customer = unique("acme").replace('_', "-");
    let secret = serde_json::json!({
        "username": role, "password": password, "host": "127.0.0.1", "port": pg_port(), "database": db.name,
    });
    moto.put(
        &format!("trusst/{customer}/db-readonly-user"),
        &secret.to_string(),
    )
    .await;

    completed(&db, 41, 5).await;
    let opts = secret_opts(&moto, &customer);
    let mut src = SourceProc::start(&db, opts.clone());
    src.wait_streaming();
    completed(&db, 42, 3).await;
    let mut reader = TopicReader::new(&src.topic);
    let expected = db.expected().await;
    assert_eq!(expected.len(), 8);
    reader.until_contacts(Duration::from_secs(60), 8);
    assert_matches_seed(&reader.latest(), &expected);
    // No [source] customer: every record names the secret's customer.
    for r in &reader.records {
        assert_eq!(r.customer.as_deref(), Some(customer.as_str()), "{r:?}");
        let e = r.event().unwrap();
        assert_eq!(e.customer.as_deref(), Some(customer.as_str()), "{e:?}");
    }
    assert!(
        src.terminate().success(),
        "source did not stop cleanly:\n{}",
        src.log()
    );
    let mut stderr = src.log();
    assert!(
        stderr.contains("database credentials read from AWS Secrets Manager"),
        "{stderr}"
    );

    let config = src.dir.path().join("source.toml");
    let check = run(&opts, &config, &["check"]);
    let out = String::from_utf8_lossy(&check.stdout).into_owned();
    stderr.push_str(&String::from_utf8_lossy(&check.stderr));
    assert!(check.status.success(), "check failed:\n{out}\n{stderr}");
    assert!(
        out.contains(&format!("events carry customer \"{customer}\"")),
        "{out}"
    );
    let backfill = run(
        &opts,
        &config,
        &[
            "backfill",
            "--start-date",
            "2000-01-01",
            "--end-date",
            "2100-01-01",
            "--dry-run",
        ],
    );
    let out = String::from_utf8_lossy(&backfill.stdout).into_owned();
    stderr.push_str(&String::from_utf8_lossy(&backfill.stderr));
    assert!(
        backfill.status.success(),
        "backfill failed:\n{out}\n{stderr}"
    );
    let range = (
        chrono::NaiveDate::from_ymd_opt(2000, 1, 1).unwrap().into(),
        chrono::NaiveDate::from_ymd_opt(2100, 1, 1).unwrap().into(),
    );
    let in_range = db.expected_between(Some(range)).await.len();
    assert!(
        out.contains(&format!("{in_range} COMPLETED contacts")),
        "{out}"
    );

    // The SDK's own trace lines are there, so the check below covers what it logs.
    assert!(
        stderr.contains("aws_smithy_runtime"),
        "no AWS SDK trace in stderr"
    );
    assert!(!stderr.contains(&password), "the password reached stderr");
    drop(src);
    db.client()
        .await
        .batch_execute(&format!(
            "REASSIGN OWNED BY {role} TO postgres; DROP OWNED BY {role}"
        ))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .unwrap();
}

/// A config with `[database] secret` for `customer`, and the environment for `moto`.
fn bad_secret_run(moto: &Moto, customer: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("source.toml");
    let opts = secret_opts(moto, customer);
    std::fs::write(
        &config,
        format!("[database]\n{}\n", opts.database.as_deref().unwrap()),
    )
    .unwrap();
    let out = run(&opts, &config, &["check"]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_secret_names_the_secret_and_the_fix() {
    let moto = Moto::start();
    let customer = unique("nobody").replace('_', "-");
    let (code, stderr) = bad_secret_run(&moto, &customer);
    assert_eq!(code, 2, "{stderr}");
    let id = format!("trusst/{customer}/db-readonly-user");
    assert!(
        stderr.contains(&format!(
            "secret {id} in AWS Secrets Manager ({REGION}) does not exist"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("create it (JSON with username, password, host, port, database)"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_without_a_field_names_the_field() {
    let moto = Moto::start();
    let customer = unique("acme").replace('_', "-");
    let password = format!("Pw-{:016x}", rand::random::<u64>());
    let secret = serde_json::json!({ "username": "ro", "password": password, "port": 5432, "database": "trusst" });
    moto.put(
        &format!("trusst/{customer}/db-readonly-user"),
        &secret.to_string(),
    )
    .await;
    let (code, stderr) = bad_secret_run(&moto, &customer);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "secret trusst/{customer}/db-readonly-user has no field host"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains(&password), "the password reached stderr");
}
