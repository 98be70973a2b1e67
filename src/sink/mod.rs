//! Sinks: Kafka consumer groups that upsert contact events into a CRM.
//!
//! One consumer group per sink config, so several sinks read the same topic independently
//! (fan-out). The [`runner`] owns delivery: batching, newest-event-per-contact, dead-lettering,
//! retries and offset commits. Each CRM is a [`Target`] in a folder of its own, registered in
//! [`targets`].
//!
//! Delivery contract: at least once. Offsets are committed only after the CRM accepted each
//! record or the record is on the dead-letter topic, so a crash re-sends (upserts are idempotent
//! on the external id) and never skips.

pub mod audit;
pub mod config;
pub mod dynamics;
#[cfg(test)]
pub mod fake;
pub mod fence;
pub mod http;
pub mod mapping;
pub mod mulesoft;
pub mod oauth;
pub mod ownership;
pub mod runner;
pub mod salesforce;
pub mod targets;
pub mod verdict;

use async_trait::async_trait;

use crate::error::Result;
use mapping::{Mapping, Record};

/// What happened to one record of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The CRM accepted it (created or updated).
    Written,
    /// The CRM refused this record for a reason retrying cannot fix; it is dead-lettered.
    Rejected(String),
}

/// A CRM the sink writes to.
///
/// Contract: `upsert` and `delete` return one [`Outcome`] per input, in order. An `Err` means
/// the request as a whole failed and nothing is known to be written: the runner retries the
/// same records (after `retry_after` when set) when the error is retryable, and dead-letters
/// them with the error's message when it is not. Writes must be idempotent (upsert on the
/// external id), since retries and replays resend records.
#[async_trait]
pub trait Target: Send {
    /// Authenticate and check the mapping against the CRM's metadata (every mapped field exists
    /// with a fitting type; option-set values filled). A missing field is a user error naming it.
    async fn prepare(&mut self, mapping: &mut Mapping) -> Result<()>;

    /// Most records one `upsert` call takes.
    fn max_batch(&self) -> usize;

    /// Upsert records on the external id.
    async fn upsert(&mut self, mapping: &Mapping, records: &[Record]) -> Result<Vec<Outcome>>;

    /// Delete the records of these contacts (a missing record counts as deleted).
    async fn delete(&mut self, mapping: &Mapping, contact_ids: &[String]) -> Result<Vec<Outcome>>;

    /// The requests `upsert` would send, one line each (method, URL, body), sending nothing.
    fn dry_run(&self, mapping: &Mapping, records: &[Record]) -> Vec<String>;
}

/// Contact ids for a log line: all of a small set, the first few of a large one.
pub fn contact_ids<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    const SHOWN: usize = 5;
    let ids: Vec<&str> = ids.collect();
    let more = ids.len().saturating_sub(SHOWN);
    let shown = ids[..ids.len().min(SHOWN)].join(",");
    if more > 0 {
        format!("{shown},... ({more} more)")
    } else {
        shown
    }
}

/// Build the configured target's client.
pub fn build_target(cfg: &config::SinkConfig) -> Result<Box<dyn Target>> {
    cfg.target.build()
}

#[cfg(test)]
mod tests {
    #[test]
    fn contact_ids_for_logs() {
        assert_eq!(super::contact_ids(["a", "b"].into_iter()), "a,b");
        assert_eq!(
            super::contact_ids(["a", "b", "c", "d", "e", "f", "g"].into_iter()),
            "a,b,c,d,e,... (2 more)"
        );
        assert_eq!(super::contact_ids(std::iter::empty()), "");
    }
}
