//! Arbitrary bytes into the Avro event decoder the sinks use (the body after the Confluent
//! header, decoded with the repo's schema supplied locally, as a registry would return it): no
//! panic, and whatever decodes re-encodes to a body that decodes to the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trusst_cdc::event::avro;

fuzz_target!(|data: &[u8]| {
    // A corrupt length prefix may ask for up to the allocation cap; keep it near Kafka's default
    // message size so the fuzzer spends its time on decoding, not on zero-filling memory.
    apache_avro::util::max_allocation_bytes(1 << 20);
    let body = avro::split_frame(data).map_or(data, |(_, body)| body);
    if let Ok(ev) = avro::decode_body(body, avro::schema()) {
        let again = avro::decode_body(&avro::encode_body(&ev), avro::schema()).expect("an encoded event decodes");
        assert_eq!(ev, again);
    }
});
