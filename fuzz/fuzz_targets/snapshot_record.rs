//! The snapshot metadata record decoder: never panics (also not in what the driver does next
//! with a decoded record), and what it accepts re-encodes to the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratafs::storage::snapshots::{decode_record, encode_record};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = decode_record(data) {
        // What listing, stat and the filters do with every stored record.
        let info = r.info("key");
        let _ = (info.created, info.updated);
        let bytes = encode_record(&r);
        let again = decode_record(&bytes).expect("an encoded record decodes");
        assert_eq!(again, r);
        assert_eq!(encode_record(&again), bytes);
    }
});
