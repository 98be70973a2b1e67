//! `trusst-cdc check`: a preflight that reports each problem with its fix.

use std::time::Duration;

use crate::config::SourceConfig;
use crate::error::{Error, Result};
use crate::kafka;
use crate::source::setup::{self, Finding};

/// Run every check, print one line each, and fail when any check failed.
pub async fn run(cfg: &SourceConfig) -> Result<()> {
    let mut findings = vec![Finding::ok(
        if cfg.customer() == crate::config::DEFAULT_CUSTOMER {
            format!(
                "events carry customer {:?} (one customer; name it with [source] customer or TRUSST_CUSTOMER)",
                cfg.customer()
            )
        } else {
            format!("events carry customer {:?}", cfg.customer())
        },
    )];
    match crate::pg::connect(cfg.database_url()).await {
        Ok(client) => {
            let s = &cfg.source;
            findings.extend(
                setup::preflight(
                    &client,
                    &s.publication,
                    &s.slot,
                    s.create_publication,
                    cfg.primary_url().is_some(),
                )
                .await?,
            );
            findings.extend(slot_findings(cfg, &client).await);
        }
        Err(e) => findings.push(Finding::bad(
            format!("PostgreSQL: {e}"),
            "check [database] (url or DATABASE_URL, or secret; sslmode, sslrootcert)",
        )),
    }
    findings.extend(kafka_findings(cfg).await);
    findings.extend(registry_findings(cfg).await);
    let mut failed = 0;
    for f in &findings {
        match (&f.fix, f.warning) {
            (None, _) => println!("ok    {}", f.what),
            (Some(advice), true) => println!("WARN  {}\n      advice: {advice}", f.what),
            (Some(fix), false) => {
                failed += 1;
                println!("FAIL  {}\n      fix: {fix}", f.what);
            }
        }
    }
    if failed > 0 {
        return Err(Error::user(format!(
            "{failed} check(s) failed; see the fixes above"
        )));
    }
    println!("all {} checks passed", findings.len());
    Ok(())
}

/// Whether the slot still holds the WAL the source needs, and whether a missing slot was lost
/// (the state store remembers this source ran).
async fn slot_findings(cfg: &SourceConfig, client: &tokio_postgres::Client) -> Vec<Finding> {
    use crate::source::slot;
    let s = &cfg.source;
    let health = match slot::read(client, &s.slot).await {
        Ok(h) => h,
        Err(e) => {
            return vec![Finding::bad(
                format!("slot {}: {e}", s.slot),
                "check the role's privileges",
            )];
        }
    };
    // The state store lives in Kafka by default; unreachable, the missing-slot case is unknown.
    let ran_before = match crate::source::state_store(cfg, client).await {
        Ok(store) => store
            .load_opt()
            .await
            .map(|st| st.is_some())
            .unwrap_or(false),
        Err(_) => false,
    };
    let safe = health.safe_wal_size.map_or_else(String::new, |b| {
        format!(", safe_wal_size {} MiB", b.max(0) >> 20)
    });
    let mut out = Vec::new();
    if let Ok(server) = crate::source::setup::server(client).await {
        let sync = client
            .query_one(
                "SELECT coalesce(current_setting('synchronized_standby_slots', true), '')",
                &[],
            )
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default();
        let (survives, what) = slot::failover_readiness(
            &s.slot,
            server.major,
            server.standby,
            &health,
            &sync,
            s.failover_slot,
        );
        out.push(if survives && !what.contains("is empty") {
            Finding::ok(what)
        } else {
            Finding::warn(
                what,
                "see docs/postgresql.md, \"PostgreSQL versions, replicas and failover\"",
            )
        });
    }
    out.extend(match slot::verdict(&s.slot, &health, ran_before) {
        slot::Verdict::Create => vec![],
        slot::Verdict::Fine => vec![Finding::ok(format!(
            "slot {} keeps the WAL the source needs (wal_status {}{safe})",
            s.slot,
            health.wal_status.as_deref().unwrap_or("?")
        ))],
        slot::Verdict::Warn(m) => vec![Finding::warn(
            m,
            "let the source catch up, or raise max_slot_wal_keep_size; alert on trusst_cdc_replication_slot_wal_status",
        )],
        slot::Verdict::Lost(m) => {
            let (what, fix) = m
                .split_once("; run ")
                .map_or((m.as_str(), ""), |(a, b)| (a, b));
            vec![Finding::bad(what.to_owned(), format!("run {fix}"))]
        }
    });
    out
}

async fn kafka_findings(cfg: &SourceConfig) -> Vec<Finding> {
    let brokers = cfg.brokers();
    let reach = kafka::reach(brokers, &cfg.kafka.properties, Duration::from_secs(10)).await;
    if let Err(e) = reach {
        return vec![Finding::bad(
            format!("Kafka at {brokers} is not reachable ({})", e.message()),
            "check KAFKA_BROKERS, the listener address and [kafka.properties] security settings",
        )];
    }
    let mut out = vec![Finding::ok(format!("Kafka at {brokers} answers"))];
    let topic = &cfg.kafka.topic;
    match kafka::describe_topic(brokers, &cfg.kafka.properties, topic).await {
        Ok(None) => out.push(Finding::ok(format!("topic {topic} will be created (compacted)"))),
        Ok(Some(t)) if !t.cleanup_policy.contains("compact") => out.push(Finding::bad(format!("topic {topic} has cleanup.policy={}: old states are never compacted away", t.cleanup_policy), format!(
                "kafka-configs --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=compact"
            ))),
        Ok(Some(t)) => out.push(Finding::ok(format!("topic {topic} is compacted with {} partition(s)", t.partitions))),
        Err(e) => out.push(Finding::bad(format!("cannot describe topic {topic}: {e}"), "check topic ACLs")),
    }
    out
}

/// With `format = "avro"`: the registry answers and would accept the event schema.
async fn registry_findings(cfg: &SourceConfig) -> Vec<Finding> {
    use crate::event::{Format, avro, registry};
    if cfg.kafka.format != Format::Avro {
        return vec![];
    }
    let registry = match cfg.registry() {
        Ok(Some(r)) => r,
        Ok(None) => {
            return vec![Finding::bad(
                "format = \"avro\" but no schema registry is configured",
                "set SCHEMA_REGISTRY_URL or [kafka] schema_registry_url",
            )];
        }
        Err(e) => {
            return vec![Finding::bad(
                format!("schema registry: {}", e.message()),
                "fix SCHEMA_REGISTRY_URL or [kafka] schema_registry_url",
            )];
        }
    };
    let subject = registry::value_subject(&cfg.kafka.topic);
    let finding = match registry.compatible(&subject, avro::SCHEMA_TEXT).await {
        Ok(None) => Finding::ok(format!(
            "schema registry at {} answers; subject {subject} will be created",
            registry.url()
        )),
        Ok(Some(true)) => Finding::ok(format!(
            "schema registry at {} accepts the event schema under {subject}",
            registry.url()
        )),
        Ok(Some(false)) => Finding::bad(
            format!("the registry's subject {subject} refuses the event schema as incompatible"),
            format!(
                "make the change backward compatible, publish to a new topic, or relax the subject's compatibility \
                 (PUT {}/config/{subject})",
                registry.url()
            ),
        ),
        Err(e) => Finding::bad(
            format!("schema registry: {}", e.message()),
            "check SCHEMA_REGISTRY_URL and that the registry is running",
        ),
    };
    vec![finding]
}
