//! Shared helpers: mounts that always unmount, layered fixtures, tree snapshots and diffs,
//! operations that run the same on two mounts. All `unsafe` of the suite is in [`sys`].

#![allow(dead_code, unused_imports)]

pub mod fixture;
pub mod mount;
pub mod ops;
pub mod sys;
pub mod tree;

pub use fixture::{Fixture, Layer};
pub use mount::{Backend, Layers, Mount};
pub use ops::{Op, Outcome};
pub use tree::{Cmp, Dirty, Snap, Tree};

use std::io;

/// The errno of a failed call, panicking (with `what`) if it succeeded.
#[track_caller]
pub fn expect_errno<T: std::fmt::Debug>(what: &str, r: io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: error without errno: {e}")),
    }
}

/// Asserts that `r` failed with `errno`.
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(what: &str, r: io::Result<T>, errno: i32) {
    let got = expect_errno(what, r);
    assert_eq!(
        sys::errno_name(got),
        sys::errno_name(errno),
        "{what}: wrong errno"
    );
}
