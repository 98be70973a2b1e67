//! trusst-cdc: change-data-capture from the Trusst platform's PostgreSQL to CRMs through Kafka.
//!
//! - [`source`]: logical replication (pgoutput) -> enriched per-contact events on a Kafka topic.
//! - [`event`]: the event format.
//! - [`kafka`]: producer, topics.
//! - [`check`]: the preflight.
//! - [`status`]: the pipeline's state (slot lag, consumer lag, dead letters, sync audit).
//! - [`questions`]: a customer's universal questions and the fields each target writes them to.
//! - [`generate`]: realistic demo and test data.
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/health`, `/ready` endpoint.
//! - [`emulator`]: a local Salesforce / Dataverse / MuleSoft emulator for tests and demos.

pub mod check;
pub mod config;
pub mod emulator;
pub mod error;
pub mod event;
pub mod generate;
pub mod kafka;
pub mod metrics;
pub mod pg;
pub mod questions;
pub mod secrets;
pub mod sink;
pub mod source;
pub mod status;
pub mod tail;
