//! Arbitrary text into the config loader (source and sink files): no panic; a file that
//! parses also resolves or fails with an error, never a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trusst_cdc::config::{self, SourceConfig};
use trusst_cdc::sink::config::SinkConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = config::parse::<SourceConfig>(text) {
        let _ = cfg.resolve(Default::default());
    }
    if let Ok(cfg) = config::parse::<SinkConfig>(text) {
        let _ = cfg.resolve(Default::default());
    }
});
