//! The `-o` parser: never panics, and what it accepts is consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratafs::options::{MountOptions, split_lowerdir, split_options};

/// Escapes one layer path the way `split_lowerdir` reads it back.
fn escape_layer(p: &str) -> String {
    let mut s = String::new();
    for c in p.chars() {
        if c == '\\' || c == ':' {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // Splitting never yields an empty item.
    let items = split_options(s);
    assert!(items.iter().all(|i| !i.is_empty()));
    // Parsing never panics; parsing twice gives the same answer (pure text).
    let a = MountOptions::parse(s);
    let b = MountOptions::parse(s);
    assert_eq!(a, b);
    if let Ok(o) = &a {
        // Every item was accepted, so parsing the items one by one gives the same options.
        let mut again = MountOptions::default();
        for i in &items {
            again
                .parse_into(&i.replace(',', "\\,"))
                .expect("an accepted item parses alone");
        }
        assert_eq!(&again, o);
    }
    // lowerdir: no empty layer; escaping the layers and joining them reads back the same.
    if let Ok(layers) = split_lowerdir(s) {
        assert!(!layers.is_empty());
        let strs: Vec<String> = layers
            .iter()
            .map(|p| p.to_str().expect("utf-8 in, utf-8 out").to_string())
            .collect();
        assert!(strs.iter().all(|l| !l.is_empty()));
        let joined = strs
            .iter()
            .map(|l| escape_layer(l))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(split_lowerdir(&joined).expect("re-split"), layers);
    }
});
