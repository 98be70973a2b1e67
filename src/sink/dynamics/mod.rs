//! dynamics target.

pub mod config;

pub use config::Config;
