//! Arbitrary bytes into the pgoutput decoder and the trigger mapping: no panic, ever.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trusst_cdc::source::{pgoutput, triggers::Tracker};

fuzz_target!(|data: &[u8]| {
    // Several messages per input, so relation state carries over into later changes.
    let mut tracker = Tracker::new();
    for chunk in data.split(|b| *b == 0xff) {
        if let Ok(msg) = pgoutput::decode(chunk) {
            let _ = tracker.effects(msg);
        }
    }
});
