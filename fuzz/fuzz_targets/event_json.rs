//! Arbitrary bytes into the event decoder the sinks use: no panic, and whatever decodes
//! re-encodes to an event that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trusst_cdc::event::ContactEvent;

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = ContactEvent::from_json(data) {
        let again = ContactEvent::from_json(&ev.to_json()).expect("an encoded event decodes");
        assert_eq!(ev, again);
    }
});
