//! The `trusst-cdc` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use trusst_cdc::config::{self, SourceConfig, SourceOverrides};
use trusst_cdc::error::{Error, Fault, Result};
use trusst_cdc::metrics::server::{self as metrics_server, Listen};
use trusst_cdc::{check, generate, pg, source};

// A thread-caching allocator: events are built and dropped by the thousand per batch, and the
// system allocator's locking showed up as a quarter of the source's CPU time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "trusst-cdc",
    version,
    about = "Change-data-capture from Trusst's PostgreSQL to CRMs through Kafka"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TRUSST_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Address of the /metrics, /health and /ready endpoint of `source` and `sink` (host:port,
    /// port 0 picks a free one, `off` disables); overrides `[metrics] listen`.
    #[arg(long, global = true, env = "TRUSST_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size difference between commands costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Stream the replication slot into the event topic.
    Source {
        /// Source config file.
        #[arg(long, default_value = "connector-config/source.toml")]
        config: PathBuf,
        #[command(flatten)]
        overrides: SourceOverrides,
        /// If the slot was invalidated or dropped: create a new one and re-publish what the gap
        /// may have changed, then stream (`[source] on_slot_lost = "recover"` for every start).
        #[arg(long)]
        recover: bool,
    },
    /// Drop the replication slot and the publication (and forget the snapshot progress), so no
    /// slot is left holding WAL on the database; says what it dropped.
    Teardown {
        /// Source config file.
        #[arg(long, default_value = "connector-config/source.toml")]
        config: PathBuf,
        #[command(flatten)]
        overrides: SourceOverrides,
        /// Keep the publication (another consumer uses it).
        #[arg(long)]
        keep_publication: bool,
    },
    /// Check the database and Kafka for everything the source needs; non-zero exit on problems.
    Check {
        /// Source config file.
        #[arg(long, default_value = "connector-config/source.toml")]
        config: PathBuf,
        #[command(flatten)]
        overrides: SourceOverrides,
    },
    /// Re-publish the COMPLETED contacts whose call falls in a date range (end date exclusive).
    Backfill {
        /// Source config file (database, Kafka, topic).
        #[arg(long, default_value = "connector-config/source.toml")]
        config: PathBuf,
        #[command(flatten)]
        overrides: SourceOverrides,
        /// First day, YYYY-MM-DD (from midnight).
        #[arg(long)]
        start_date: chrono::NaiveDate,
        /// Day after the last, YYYY-MM-DD (exclusive, as in the integration guide).
        #[arg(long)]
        end_date: chrono::NaiveDate,
        /// Days per window.
        #[arg(long, default_value_t = 1)]
        batch_days: u32,
        /// Count the contacts per window; publish nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Upsert events from the topic into a CRM (one consumer group per config).
    Sink {
        /// Sink config file (connector-config/salesforce.toml, dynamics.toml, mulesoft.toml).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        overrides: trusst_cdc::sink::config::SinkOverrides,
        /// Where to start: committed, earliest, latest, offset:P:O[,P:O], timestamp:<RFC 3339>.
        #[arg(long, default_value = "committed")]
        from: trusst_cdc::sink::runner::StartFrom,
        /// Print the CRM requests that would be sent, send none, commit nothing.
        #[arg(long)]
        dry_run: bool,
        /// Re-drive the dead-letter topic (up to its current end) through the current mapping.
        #[arg(long)]
        redrive: bool,
        /// Stop after this long without a record (one-off replays), e.g. 30s.
        #[arg(long, value_parser = cli_duration)]
        until_idle: Option<Duration>,
    },
    /// Print the pipeline's state: slot lag, topic end offsets, per-sink consumer lag, dead
    /// letters and the sync audit's last rows; non-zero exit when something is missing.
    Status {
        /// Source config files (database, slot, Kafka, topic), repeatable: one per customer
        /// database; the flags and environment below apply to each.
        #[arg(long = "config", default_value = "connector-config/source.toml")]
        configs: Vec<PathBuf>,
        #[command(flatten)]
        overrides: SourceOverrides,
        /// Sink config files (repeatable); default: the salesforce, dynamics and mulesoft configs
        /// beside each source config.
        #[arg(long = "sink")]
        sinks: Vec<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the customer's universal questions (the integration guide's step 1) and, for each
    /// target, the field each answer goes to: a `[mapping.questions]` block to start a sink
    /// config from, and the CRM field type to create.
    Questions {
        /// Source config file (the database; Kafka is not needed).
        #[arg(long, default_value = "connector-config/source.toml")]
        config: PathBuf,
        #[command(flatten)]
        overrides: SourceOverrides,
        /// Sink configs whose mapping to use (repeatable); default: each target's defaults.
        #[arg(long = "sink")]
        sinks: Vec<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the events on a topic as they arrive.
    Tail {
        /// Kafka bootstrap servers.
        #[arg(long, env = "KAFKA_BROKERS")]
        kafka_brokers: String,
        /// Topic.
        #[arg(long, env = "TRUSST_TOPIC", default_value = "trusst.contacts")]
        topic: String,
        /// Start at the oldest record instead of new ones.
        #[arg(long)]
        from_beginning: bool,
        /// Print the values as JSON (JSON records as they are, Avro records decoded).
        #[arg(long)]
        json: bool,
        /// Schema registry for Avro records (Confluent-compatible API base).
        #[arg(long, env = "SCHEMA_REGISTRY_URL")]
        schema_registry_url: Option<String>,
        /// Stop after this many records.
        #[arg(long)]
        max: Option<usize>,
        /// Stop after this long without a record (e.g. 10s).
        #[arg(long, value_parser = cli_duration)]
        idle: Option<Duration>,
        /// A librdkafka property for the consumer, KEY=VALUE, repeatable (e.g.
        /// `-X security.protocol=SSL -X ssl.ca.location=ca.pem`), as `[kafka.properties]`.
        #[arg(short = 'X', long = "kafka-property", value_name = "KEY=VALUE", value_parser = parse_property)]
        kafka_property: Vec<(String, String)>,
    },
    /// Write realistic demo contacts (schema and questions included) into a database.
    Generate {
        /// PostgreSQL URL.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Contacts to write.
        #[arg(long, default_value_t = 100)]
        contacts: usize,
        /// Contacts per transaction (each contact takes three transactions' worth of stages).
        #[arg(long, default_value_t = 100)]
        chunk: usize,
        /// Target contacts per second; 0 writes as fast as possible.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Connections writing chunks side by side (a steady rate needs more than one once
        /// commits wait for the disk).
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Stop handing out chunks after this long (e.g. `30s`), even short of --contacts: a
        /// load step of fixed length when the machine cannot keep up with --rate.
        #[arg(long, value_parser = cli_duration)]
        duration: Option<Duration>,
        /// Random seed, for reproducible data.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Only load the schema and questions.
        #[arg(long)]
        schema_only: bool,
    },
    /// Serve a local CRM emulator (Salesforce, Dataverse, MuleSoft) with fault injection.
    CrmEmulator(trusst_cdc::emulator::EmulatorArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRUSST_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rdkafka=warn,tokio_postgres=warn")
    });
    // Colours only on a terminal: a log file or a collector would keep the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A watch that turns true on SIGTERM or Ctrl-C.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stop requested");
        let _ = tx.send(true);
    });
    rx
}

/// The source config with overrides applied and, with `[database] secret`, the credentials read.
async fn source_config(path: &Path, overrides: SourceOverrides) -> Result<SourceConfig> {
    let mut cfg = config::load::<SourceConfig>(path)?.resolve(overrides)?;
    cfg.fetch_secret().await?;
    Ok(cfg)
}

async fn run(cli: Cli) -> Result<()> {
    let metrics_flag = cli.metrics_listen;
    match cli.command {
        Command::Source {
            config,
            overrides,
            recover,
        } => {
            let mut cfg = source_config(&config, overrides).await?;
            if recover {
                cfg.source.on_slot_lost = config::SlotLost::Recover;
            }
            let listen = Listen::resolve(
                metrics_flag.as_deref(),
                cfg.metrics.listen.as_deref(),
                metrics_server::SOURCE_DEFAULT,
            )?;
            metrics_server::start(&listen, source::READY_CONDITIONS).await?;
            source::run(cfg, shutdown_signal()).await
        }
        Command::Check { config, overrides } => {
            let cfg = source_config(&config, overrides).await?;
            check::run(&cfg).await
        }
        Command::Teardown {
            config,
            overrides,
            keep_publication,
        } => {
            let cfg = source_config(&config, overrides).await?;
            for line in source::teardown(&cfg, keep_publication).await? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Backfill {
            config,
            overrides,
            start_date,
            end_date,
            batch_days,
            dry_run,
        } => {
            let cfg = source_config(&config, overrides).await?;
            let range = source::backfill::Range::new(start_date, end_date, batch_days)?;
            let totals = source::backfill::run(&cfg, &range, dry_run, shutdown_signal()).await?;
            if dry_run {
                println!(
                    "{} COMPLETED contacts between {start_date} and {end_date} (exclusive)",
                    totals.contacts
                );
            } else {
                println!(
                    "published {} events for {} COMPLETED contacts",
                    totals.published, totals.contacts
                );
            }
            Ok(())
        }
        Command::Sink {
            config,
            overrides,
            from,
            dry_run,
            redrive,
            until_idle,
        } => {
            let cfg = config::load::<trusst_cdc::sink::config::SinkConfig>(&config)?
                .resolve(overrides)?;
            let target = trusst_cdc::sink::build_target(&cfg)?;
            if !dry_run && !redrive && until_idle.is_none() {
                // One-off runs (dry runs, re-drives, replays) serve nothing: they end on their own
                // and must not take the running sink's address.
                let listen = Listen::resolve(
                    metrics_flag.as_deref(),
                    cfg.metrics.listen.as_deref(),
                    metrics_server::SINK_DEFAULT,
                )?;
                metrics_server::start(&listen, trusst_cdc::sink::runner::READY_CONDITIONS).await?;
            }
            let opts = trusst_cdc::sink::runner::RunOptions {
                start: from,
                dry_run,
                redrive,
                until_idle,
            };
            let totals =
                trusst_cdc::sink::runner::run(&cfg, target, opts, shutdown_signal()).await?;
            tracing::info!(
                consumed = totals.consumed,
                written = totals.written,
                dead_lettered = totals.dead_lettered,
                superseded = totals.superseded,
                "sink finished"
            );
            Ok(())
        }
        Command::Status {
            configs,
            overrides,
            sinks,
            json,
        } => {
            let mut sources = Vec::new();
            for config in &configs {
                let cfg = source_config(config, overrides.clone()).await?;
                sources.push((config.clone(), cfg));
            }
            let sinks = if sinks.is_empty() {
                let mut found: Vec<PathBuf> = Vec::new();
                for config in &configs {
                    let dir = config.parent().map(PathBuf::from).unwrap_or_default();
                    for t in trusst_cdc::sink::targets::TargetKind::ALL {
                        let p = dir.join(format!("{}.toml", t.name()));
                        if p.exists() && !found.contains(&p) {
                            found.push(p);
                        }
                    }
                }
                found
            } else {
                sinks
            };
            let sinks = trusst_cdc::status::load_sinks(&sinks)?;
            let report = trusst_cdc::status::gather(&sources, &sinks).await;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report)
                        .map_err(|e| Error::internal(format!("status as JSON: {e}")))?
                );
            } else {
                print!("{}", trusst_cdc::status::render(&report));
            }
            match report.problems.len() {
                0 => Ok(()),
                n => Err(Error::external(format!(
                    "{n} problem(s) found; see the lines above"
                ))),
            }
        }
        Command::Questions {
            config,
            overrides,
            sinks,
            json,
        } => {
            let mut cfg =
                config::load::<SourceConfig>(&config)?.resolve_database_only(overrides)?;
            cfg.fetch_secret().await?;
            let client = pg::connect(cfg.database_url()).await?;
            let questions = trusst_cdc::questions::universal(&client).await?;
            let targets = if sinks.is_empty() {
                trusst_cdc::questions::Target::defaults()
            } else {
                sinks
                    .iter()
                    .map(|p| {
                        let sink = config::load::<trusst_cdc::sink::config::SinkConfig>(p)?;
                        Ok(trusst_cdc::questions::Target::of_sink(p.clone(), &sink))
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            let report = trusst_cdc::questions::plan(cfg.customer(), questions, &targets);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report)
                        .map_err(|e| Error::internal(format!("questions as JSON: {e}")))?
                );
            } else {
                print!("{}", trusst_cdc::questions::render(&report, &targets));
            }
            Ok(())
        }
        Command::Tail {
            kafka_brokers,
            topic,
            from_beginning,
            json,
            schema_registry_url,
            max,
            idle,
            kafka_property,
        } => {
            let decoder = trusst_cdc::event::Decoder::new(trusst_cdc::config::registry(
                schema_registry_url.as_deref(),
                trusst_cdc::config::registry_auth(None, None, None)?,
            )?);
            let opts = trusst_cdc::tail::Options {
                brokers: kafka_brokers,
                properties: kafka_property.into_iter().collect(),
                topic,
                from_beginning,
                json,
                max,
                idle,
            };
            trusst_cdc::tail::run(&opts, &decoder).await
        }
        Command::Generate {
            database_url,
            contacts,
            chunk,
            rate,
            connections,
            duration,
            seed,
            schema_only,
        } => {
            let client = pg::connect(&database_url).await?;
            generate::init_schema(&client).await?;
            generate::ensure_questions(&client).await?;
            if schema_only {
                return Ok(());
            }
            if chunk == 0 || connections == 0 {
                return Err(Error::user("--chunk and --connections must be at least 1"));
            }
            // Chunks are made here, in order, and paced; the writers take them as they come.
            let (tx, rx) = tokio::sync::mpsc::channel::<Vec<generate::NewContact>>(connections);
            let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
            let mut clients = vec![client];
            for _ in 1..connections {
                clients.push(pg::connect(&database_url).await?);
            }
            let mut writers = tokio::task::JoinSet::new();
            for mut client in clients {
                let rx = rx.clone();
                writers.spawn(async move {
                    loop {
                        let Some(batch) = rx.lock().await.recv().await else {
                            return Ok::<_, Error>(());
                        };
                        generate::write_contacts(&mut client, &batch).await?;
                    }
                });
            }
            // Only the writers may hold the receiver: once they have all failed (a database
            // restart), sending fails and the generator exits instead of waiting forever.
            drop(rx);
            let mut g = generate::Generator::new(seed, generate::Options::default());
            let started = Instant::now();
            let mut done = 0usize;
            while done < contacts {
                let n = chunk.min(contacts - done);
                let batch: Vec<_> = (0..n).map(|_| g.contact()).collect();
                let due =
                    (rate > 0.0).then(|| started + Duration::from_secs_f64(done as f64 / rate));
                // Behind schedule, the clock decides: a step of fixed length even when the
                // database cannot keep up with --rate.
                let at = due.map_or_else(Instant::now, |due| due.max(Instant::now()));
                if duration.is_some_and(|d| at >= started + d) {
                    break;
                }
                if let Some(due) = due {
                    tokio::time::sleep_until(due.into()).await;
                }
                if tx.send(batch).await.is_err() {
                    break; // a writer failed; its error is reported below
                }
                done += n;
            }
            drop(tx);
            while let Some(res) = writers.join_next().await {
                res.map_err(|e| Error::internal(format!("generator writer failed: {e}")))??;
            }
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                contacts = done,
                seconds = format!("{secs:.1}"),
                rate = format!("{:.0}/s", done as f64 / secs.max(0.001)),
                "generated COMPLETED contacts"
            );
            Ok(())
        }
        Command::CrmEmulator(args) => trusst_cdc::emulator::run(args, shutdown_signal()).await,
    }
}

/// `KEY=VALUE` of `--kafka-property`.
fn parse_property(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!(
            "expected KEY=VALUE (a librdkafka property such as security.protocol=SSL), got {s:?}"
        )),
    }
}

/// The source runs on one thread unless TOKIO_WORKER_THREADS asks for a worker pool: its
/// stages hand each other small messages (one per replication message), and on the few cores a
/// database host spares, waking another thread for each costs more CPU than a second thread
/// gains. Measured in BENCHMARKS.md: on 2 cores, a third less CPU and a third of the commit-to-Kafka
/// p99 at 1,000 contacts/s against one worker beside the main thread. librdkafka keeps its own
/// threads either way.
fn runtime(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    if matches!(command, Command::Source { .. })
        && std::env::var_os("TOKIO_WORKER_THREADS").is_none()
    {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match runtime(&cli.command) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            match e.fault {
                Fault::User => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}

/// A duration flag: humantime text with the config files' checks (longer than zero, at most a
/// year).
fn cli_duration(text: &str) -> std::result::Result<Duration, String> {
    let v = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    trusst_cdc::config::duration::check(v)
}
