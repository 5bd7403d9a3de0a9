//! The stratafs integration suite: one test binary (as ripgrep does), so the crate is linked
//! once. Every test mounts real instances in its own temp dirs; kernel overlayfs is the oracle.
//!
//! Needs root, /dev/fuse and kernel overlayfs. Run with `cargo test --test tests`.

mod suite;
mod util;
