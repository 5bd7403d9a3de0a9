//! Id mappings and `override_stat` values: never panic; mapped ids round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratafs::overlay::idmap::{IdMap, Override};

fuzz_target!(|data: &[u8]| {
    let (ids, rest) = data.split_at(data.len().min(16));
    if let Ok(s) = std::str::from_utf8(rest)
        && let Ok(m) = IdMap::parse(s)
    {
        assert!(!m.is_identity(), "a parsed mapping has ranges");
        for c in ids.chunks(4) {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            let id = u32::from_le_bytes(b);
            if let Some(h) = m.to_host(id) {
                // The first range mapping id wins both ways unless ranges overlap on the
                // host side; the host id must at least map back to some container id.
                let back = m.to_container(h);
                let _ = m.to_host(back);
            }
            let _ = m.to_container(id);
        }
    }
    if let Some(o) = Override::parse(data) {
        assert!(o.mode <= 0o7777);
        // What we write reads back the same (a type ending in NUL is trimmed: not written by us).
        if !o.kind.as_deref().is_some_and(|k| k.ends_with('\0')) {
            assert_eq!(Override::parse(&o.encode()), Some(o));
        }
    }
});
