//! Origin xattr values and marker names: never panic, decode what encodes.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use libfuzzer_sys::fuzz_target;
use stratafs::overlay::layer::{decode_origin, is_marker_name, is_private_xattr, whiteout_name};

fuzz_target!(|data: &[u8]| {
    match decode_origin(data) {
        Some(ino) => {
            assert_eq!(data.len(), 8);
            assert_eq!(&ino.to_le_bytes()[..], data);
        }
        None => assert_ne!(data.len(), 8),
    }
    let name = OsStr::from_bytes(data);
    let wh = whiteout_name(name);
    assert!(is_marker_name(&wh));
    assert_eq!(&wh.as_bytes()[4..], data);
    let _ = is_private_xattr(name);
});
