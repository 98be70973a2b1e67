//! `trusst-cdc check`: a preflight that reports each problem with its fix.

use std::time::Duration;

use crate::config::SourceConfig;
use crate::error::{Error, Result};
use crate::kafka;
use crate::source::setup::{self, Finding};

/// Run every check, print one line each, and fail when any check failed.
pub async fn run(cfg: &SourceConfig) -> Result<()> {
    let mut findings = Vec::new();
    match crate::pg::connect(cfg.database_url()).await {
        Ok(client) => {
            let s = &cfg.source;
            findings.extend(
                setup::preflight(&client, &s.publication, &s.slot, s.create_publication).await?,
            );
        }
        Err(e) => findings.push(Finding {
            what: format!("PostgreSQL: {e}"),
            fix: Some(
                "check [database] (url or DATABASE_URL, or secret; sslmode, sslrootcert)".into(),
            ),
        }),
    }
    findings.extend(kafka_findings(cfg).await);
    findings.extend(registry_findings(cfg).await);
    let mut failed = 0;
    for f in &findings {
        match &f.fix {
            None => println!("ok    {}", f.what),
            Some(fix) => {
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

async fn kafka_findings(cfg: &SourceConfig) -> Vec<Finding> {
    let brokers = cfg.brokers();
    let reach = match kafka::producer(brokers, &cfg.kafka.properties) {
        Ok(p) => kafka::ping(&p, brokers, Duration::from_secs(10)).await,
        Err(e) => Err(e),
    };
    if let Err(e) = reach {
        return vec![Finding {
            what: format!("Kafka at {brokers} is not reachable ({})", e.message()),
            fix: Some("check KAFKA_BROKERS, the listener address and [kafka.properties] security settings".into()),
        }];
    }
    let mut out = vec![Finding {
        what: format!("Kafka at {brokers} answers"),
        fix: None,
    }];
    let topic = &cfg.kafka.topic;
    match kafka::describe_topic(brokers, &cfg.kafka.properties, topic).await {
        Ok(None) => out.push(Finding { what: format!("topic {topic} will be created (compacted)"), fix: None }),
        Ok(Some(t)) if !t.cleanup_policy.contains("compact") => out.push(Finding {
            what: format!("topic {topic} has cleanup.policy={}: old states are never compacted away", t.cleanup_policy),
            fix: Some(format!(
                "kafka-configs --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=compact"
            )),
        }),
        Ok(Some(t)) => out.push(Finding {
            what: format!("topic {topic} is compacted with {} partition(s)", t.partitions),
            fix: None,
        }),
        Err(e) => out.push(Finding { what: format!("cannot describe topic {topic}: {e}"), fix: Some("check topic ACLs".into()) }),
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
            return vec![Finding {
                what: "format = \"avro\" but no schema registry is configured".into(),
                fix: Some("set SCHEMA_REGISTRY_URL or [kafka] schema_registry_url".into()),
            }];
        }
        Err(e) => {
            return vec![Finding {
                what: format!("schema registry: {}", e.message()),
                fix: Some("fix SCHEMA_REGISTRY_URL or [kafka] schema_registry_url".into()),
            }];
        }
    };
    let subject = registry::value_subject(&cfg.kafka.topic);
    let finding = match registry.compatible(&subject, avro::SCHEMA_TEXT).await {
        Ok(None) => Finding {
            what: format!(
                "schema registry at {} answers; subject {subject} will be created",
                registry.url()
            ),
            fix: None,
        },
        Ok(Some(true)) => Finding {
            what: format!(
                "schema registry at {} accepts the event schema under {subject}",
                registry.url()
            ),
            fix: None,
        },
        Ok(Some(false)) => Finding {
            what: format!(
                "the registry's subject {subject} refuses the event schema as incompatible"
            ),
            fix: Some(format!(
                "make the change backward compatible, publish to a new topic, or relax the subject's compatibility \
                 (PUT {}/config/{subject})",
                registry.url()
            )),
        },
        Err(e) => Finding {
            what: format!("schema registry: {}", e.message()),
            fix: Some("check SCHEMA_REGISTRY_URL and that the registry is running".into()),
        },
    };
    vec![finding]
}
