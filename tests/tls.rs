//! TLS to PostgreSQL and Kafka with the test CA that `scripts/services.sh tls-certs` makes: a
//! cluster that accepts only TLS (`TLS_DATABASE_URL`, started by scripts/test.sh with
//! `PG_SSL_CERT`/`PG_SSL_KEY`) and the broker's SSL listener (`KAFKA_SSL_BROKERS`).

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

/// `TLS_DATABASE_URL`: the cluster with `ssl = on` and only `hostssl` entries.
fn tls_base() -> String {
    std::env::var("TLS_DATABASE_URL").expect(
        "TLS_DATABASE_URL is not set: run scripts/test.sh (it starts the TLS cluster with \
         PG_INSTANCE=pg-tls PG_SSL_CERT=.run/tls/server.pem PG_SSL_KEY=.run/tls/server.key scripts/services.sh start-pg)",
    )
}

/// A file of the test CA folder (`TLS_DIR`, default .run/tls).
fn tls_file(name: &str) -> String {
    let dir = std::env::var("TLS_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.run/tls").into());
    let path = PathBuf::from(dir).join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/services.sh tls-certs",
        path.display()
    );
    path.display().to_string()
}

fn ssl_brokers() -> String {
    std::env::var("KAFKA_SSL_BROKERS")
        .expect("KAFKA_SSL_BROKERS is not set: eval \"$(scripts/services.sh env)\"")
}

fn sasl_brokers() -> String {
    std::env::var("KAFKA_SASL_BROKERS")
        .expect("KAFKA_SASL_BROKERS is not set: eval \"$(scripts/services.sh env)\"")
}

/// `trusst-cdc tail` of `topic` from the beginning on the SSL listener until 15 s without a
/// record, with `extra` flags.
fn tail_ssl(topic: &str, extra: &[&str]) -> Output {
    tail_on(&ssl_brokers(), topic, extra)
}

/// The same on `brokers`.
fn tail_on(brokers: &str, topic: &str, extra: &[&str]) -> Output {
    std::process::Command::new(bin())
        .args(["tail", "--kafka-brokers", brokers, "--topic", topic])
        .args(["--from-beginning", "--idle", "15s"])
        .args(extra)
        .output()
        .expect("run trusst-cdc tail")
}

/// `tail --json` succeeded and printed an event for exactly the contacts of `expected`.
fn assert_tailed<V>(out: &Output, expected: &std::collections::BTreeMap<String, V>) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tailed: std::collections::BTreeSet<String> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON event per line"))
        .map(|v| {
            v["trusst_contact_id"]
                .as_str()
                .expect("trusst_contact_id")
                .to_owned()
        })
        .collect();
    assert_eq!(tailed, expected.keys().cloned().collect(), "{stdout}");
}

/// `url` with TLS parameters (the URL has no query yet).
fn with_params(url: &str, params: &str) -> String {
    format!("{url}?{params}")
}

/// `trusst-cdc check` with `db_url` and, optionally, the SSL listener with `kafka_ca`.
fn check(db_url: &str, kafka_ca: Option<&str>) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("source.toml");
    let mut text = format!("[kafka]\ntopic = \"{}\"\n", unique("tls").replace('_', "-"));
    let mut opts = SourceOpts::default();
    if let Some(ca) = kafka_ca {
        text.push_str(&format!(
            "[kafka.properties]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"{ca}\"\n"
        ));
        opts.brokers = Some(ssl_brokers());
    }
    std::fs::write(&config, text).unwrap();
    opts.command("check", &config, db_url)
        .output()
        .expect("run trusst-cdc check")
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_postgres_and_ssl_kafka_end_to_end() {
    let db = TestDb::new_on(&tls_base(), "tls").await;
    completed(&db, 51, 5).await;
    let ca = tls_file("ca.pem");
    let opts = SourceOpts {
        brokers: Some(ssl_brokers()),
        kafka_properties: vec![
            ("security.protocol".into(), "SSL".into()),
            ("ssl.ca.location".into(), ca.clone()),
        ],
        ..Default::default()
    };
    // The stream and its re-reads through verify-full: the URL's host is 127.0.0.1, which the
    // server certificate lists as an IP address.
    let tls_db = TestDb {
        name: db.name.clone(),
        url: with_params(&db.url, &format!("sslmode=verify-full&sslrootcert={ca}")),
    };
    let mut src = SourceProc::start(&tls_db, opts);
    src.wait_streaming();
    completed(&db, 52, 3).await;
    let mut reader = TopicReader::new(&src.topic);
    let expected = db.expected().await;
    assert_eq!(expected.len(), 8);
    reader.until_contacts(Duration::from_secs(60), 8);
    assert_matches_seed(&reader.latest(), &expected);

    // `tail` reads the same events through the SSL listener with the same properties.
    let ssl_ca = format!("ssl.ca.location={ca}");
    let out = tail_ssl(
        &src.topic,
        &["--json", "-X", "security.protocol=SSL", "-X", &ssl_ca],
    );
    assert_tailed(&out, &expected);
    // Without them the SSL listener cannot be read, and tail says what to pass.
    let out = tail_ssl(&src.topic, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "tail without SSL settings succeeded");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("-X security.protocol=SSL"), "{stderr}");

    // The replication connection itself is encrypted (pg_hba allows nothing else, but say it).
    let c = db.client().await;
    let row = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid \
             WHERE a.backend_type = 'walsender' AND a.application_name = $1 AND s.ssl",
            &[&format!("trusst-cdc:{}", src.slot)],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        1,
        "no TLS walsender for the slot:\n{}",
        src.log()
    );
    assert!(
        src.terminate().success(),
        "source did not stop cleanly:\n{}",
        src.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_with_the_wrong_ca_fails_naming_sslrootcert() {
    let wrong = tls_file("other-ca.pem");
    let url = with_params(
        &tls_base(),
        &format!("sslmode=verify-full&sslrootcert={wrong}"),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("source.toml");
    std::fs::write(
        &config,
        format!("[source]\nstate_dir = \"{}\"\n", dir.path().display()),
    )
    .unwrap();
    let mut child = SourceOpts::default()
        .command("source", &config, &url)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "source kept running with a wrong CA"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("TLS handshake with PostgreSQL at 127.0.0.1"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("does not verify against sslrootcert {wrong}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "set sslrootcert to the PEM file of the CA that signed the server's certificate"
        ),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn require_and_verify_ca_connect_and_a_plain_connection_is_refused() {
    let db = TestDb::new_on(&tls_base(), "tls").await;
    let ca = tls_file("ca.pem");
    // `localhost` is in the certificate too; verify-ca ignores the name either way.
    for params in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-ca&sslrootcert={ca}"),
    ] {
        let out = check(&with_params(&db.url, &params), None);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{params}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("checks passed"), "{stdout}");
    }
    let out = check(&with_params(&db.url, "sslmode=disable"), None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a plain connection got in:\n{stdout}"
    );
    assert!(stdout.contains("no encryption"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_ssl_with_the_wrong_ca_is_reported_by_check() {
    let db = TestDb::new_on(&tls_base(), "tls").await;
    let url = with_params(&db.url, "sslmode=require");
    let good = check(&url, Some(&tls_file("ca.pem")));
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(
        stdout.contains(&format!("ok    Kafka at {} answers", ssl_brokers())),
        "{stdout}"
    );
    let bad = check(&url, Some(&tls_file("other-ca.pem")));
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "FAIL  Kafka at {} is not reachable",
            ssl_brokers()
        )),
        "{stdout}"
    );
    // The cause, not a timeout: the certificate does not verify against the CA given.
    assert!(
        stdout.contains("certificate verify failed")
            && stdout.contains("check security.protocol and ssl.ca.location"),
        "{stdout}"
    );
}

/// The broker's SASL_SSL listener (TLS, then a user and password, as managed Kafka services
/// offer): the source authenticates with the credentials from `KAFKA_SASL_USERNAME` and
/// `KAFKA_SASL_PASSWORD`, and `tail` with the same settings given as `-X`. A wrong password
/// stops the source at once with the reason and the settings to fix, not after a timeout that
/// blames the broker.
#[tokio::test(flavor = "multi_thread")]
async fn sasl_ssl_with_credentials_from_the_environment() {
    let db = TestDb::new("sasl").await;
    completed(&db, 61, 4).await;
    let ca = tls_file("ca.pem");
    let user = std::env::var("KAFKA_SASL_USER").expect("KAFKA_SASL_USER (scripts/services.sh env)");
    let password = std::env::var("KAFKA_SASL_PASSWORD")
        .expect("KAFKA_SASL_PASSWORD (scripts/services.sh env)");
    // The listener's settings; the user and password come from the environment.
    let settings = [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanisms", "PLAIN"),
        ("ssl.ca.location", ca.as_str()),
    ];
    let opts = |password: &str| SourceOpts {
        brokers: Some(sasl_brokers()),
        kafka_properties: settings
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        env: vec![
            ("KAFKA_SASL_USERNAME".into(), user.clone()),
            ("KAFKA_SASL_PASSWORD".into(), password.into()),
        ],
        ..Default::default()
    };

    let mut refused = SourceProc::start(&db, opts("not-the-password"));
    let status = refused.wait_exit(Duration::from_secs(60));
    let log = refused.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains(&format!(
            "Kafka at {} refused the connector's credentials",
            sasl_brokers()
        )),
        "{log}"
    );
    assert!(log.contains("sasl.username and sasl.password"), "{log}");
    assert!(
        !log.contains(&password) && !log.contains("not-the-password"),
        "a password reached the log:\n{log}"
    );

    let mut src = SourceProc::start(&db, opts(&password));
    src.wait_streaming();
    completed(&db, 62, 3).await;
    let expected = db.expected().await;
    assert_eq!(expected.len(), 7);
    // Read back on the plain listener of the same broker.
    let mut reader = TopicReader::new(&src.topic);
    reader.until_contacts(Duration::from_secs(60), 7);
    assert_matches_seed(&reader.latest(), &expected);

    let flags: Vec<String> = settings
        .iter()
        .chain(&[
            ("sasl.username", user.as_str()),
            ("sasl.password", password.as_str()),
        ])
        .flat_map(|(k, v)| ["-X".to_owned(), format!("{k}={v}")])
        .collect();
    let mut args = vec!["--json"];
    args.extend(flags.iter().map(String::as_str));
    assert_tailed(&tail_on(&sasl_brokers(), &src.topic, &args), &expected);

    // A Salesforce sink reads the topic through the same listener, the same way.
    let emu = crm::Emulator::start(&[]);
    let sink_config = || {
        crm::sink_config("salesforce", &src.topic, |t| {
            let kafka = t.get_mut("kafka").unwrap().as_table_mut().unwrap();
            let props: toml::Table = settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).into()))
                .collect();
            kafka.insert("properties".into(), props.into());
        })
    };
    let brokers = sasl_brokers();
    let start_sink = |password: &str| {
        let (dir, cfg) = sink_config();
        let env = [
            ("KAFKA_BROKERS", brokers.as_str()),
            ("KAFKA_SASL_USERNAME", user.as_str()),
            ("KAFKA_SASL_PASSWORD", password),
        ];
        crm::SinkProc::start_with_env(&emu, dir, cfg, &[], &env)
    };
    let mut refused = start_sink("not-the-password");
    let status = refused.wait_exit(Duration::from_secs(60));
    let log = refused.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("refused the connector's credentials"), "{log}");
    let mut sink = start_sink(&password);
    crm::eventually(
        Duration::from_secs(60),
        "the CRM to match the seed query",
        || crm::crm_matches(&emu, "salesforce", &expected),
    );
    sink.assert_running();
    assert!(sink.terminate().success(), "{}", sink.log());
    assert!(
        src.terminate().success(),
        "source did not stop cleanly:\n{}",
        src.log()
    );
}
