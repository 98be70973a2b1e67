//! salesforce target.

pub mod auth;
pub mod bulk;
pub mod collections;
pub mod config;
pub mod describe;
pub mod limits;

pub use config::Config;
